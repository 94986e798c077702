"""Helpers for tests of the model (the project's own and users' scenarios)."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from kmemcg.core.kasan import KasanOops
from kmemcg.mm.slub import SLAB_ACCOUNT

if TYPE_CHECKING:
    from kmemcg.core.task import KThread, Task
    from kmemcg.kernel import Kernel


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.002) -> bool:
    """Bounded poll for a state no event announces (e.g. a task asleep in a model wait:
    ``task.blocked_on``). Returns whether ``pred()`` became true within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@contextmanager
def held_by_another_task(k: Kernel, lock: Any, name: str = "holder",
                         timeout: float = 5.0) -> Iterator[KThread]:
    """Run the block while a model thread ``name`` holds ``lock`` (anything usable in a
    ``with``); the holder lets go when the block ends. Yields the holder's thread."""
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(timeout)

    t = k.kthread_run(holder, name=name)
    if not held.wait(timeout):
        raise TimeoutError(f"{name} did not get {lock!r} within {timeout}s")
    try:
        yield t
    finally:
        done.set()
        t.join(timeout)


class Hold:
    """Something a model thread sleeps on (``k.waits.wait(task, hold, hold.ev.wait)``) until
    the test calls :meth:`release`; nobody "owns" it for the deadlock detector."""

    def __init__(self, name: str = "test_hold") -> None:
        self.name = name
        self.ev = threading.Event()

    def release(self) -> None:
        self.ev.set()

    def waiter_owners(self) -> list[Task]:
        return []


def hold_grace_period(k: Kernel, timeout: float = 5.0,
                      name: str = "reader") -> tuple[threading.Event, KThread]:
    """Start an RCU reader (model thread ``name``) that keeps every grace period, so every
    call_rcu, waiting until the returned event is set; returns (that event, the reader)."""
    inside, out = threading.Event(), threading.Event()

    def reader() -> None:
        with k.rcu.read():
            inside.set()
            out.wait(timeout)

    t = k.kthread_run(reader, name=name)
    if not inside.wait(timeout):
        raise TimeoutError(f"{name} did not enter its RCU read section within {timeout}s")
    return out, t


def in_memcg(k: Kernel, name: str = "m") -> Any:
    """Create memcg ``name``, activate its kmem accounting and move the current task into it;
    returns the memcg."""
    mc = k.memcg
    m = mc.create(name)
    mc.memcg_activate_kmem(m)
    mc.attach(k.current(), m)
    return m


def relocation_ahead(k: Kernel, name: str = "dentry") -> tuple[Any, Any]:
    """An accounted root cache ``name`` and a kmem-active memcg "m", with kmem-active memcgs
    "o0".."o2" beside it: every kmemcg_id below the arrays' initial size is taken, so the next
    activation relocates the root caches' memcg_caches arrays. Returns (root, m)."""
    sl, mc = k.slab, k.memcg
    s = sl.kmem_cache_create(name, 192, flags=SLAB_ACCOUNT)
    m = mc.create("m")
    mc.memcg_activate_kmem(m)
    for i in range(3):
        mc.memcg_activate_kmem(mc.create(f"o{i}"))
    return s, m


class OwnedCaches:
    """The owner protocol of the churn tests, as a module owns its cache: owners
    :meth:`publish` caches; users :meth:`use` a random published one (counted in flight);
    an owner :meth:`destroy` its cache only after unpublishing it and waiting until nobody
    uses it any more, so a finding is the model's, not the test's use-after-destroy.

    Users are counted per publication, or with ``per_cache`` per cache object (the aliases a
    merge returns then share one count and one wait)."""

    def __init__(self, per_cache: bool = False) -> None:
        self.per_cache = per_cache
        self.lock = threading.Lock()
        self.live: list[tuple[Hashable, Any]] = []
        self.users: dict[Hashable, int] = {}

    def publish(self, s: Any) -> Hashable:
        """Make ``s`` available to users; returns the handle to retire it with."""
        h: Hashable = id(s) if self.per_cache else object()
        with self.lock:
            self.live.append((h, s))
            self.users.setdefault(h, 0)
        return h

    def retire(self, h: Hashable, s: Any, wait: bool = True) -> None:
        """Unpublish ``s``; with ``wait``, a bounded-step poll until it has no users left."""
        with self.lock:
            self.live.remove((h, s))
        while wait:
            with self.lock:
                if self.users[h] == 0:
                    if not self.per_cache:
                        del self.users[h]
                    break
            time.sleep(0.0005)

    def destroy(self, k: Kernel, h: Hashable, s: Any, wait: bool = True) -> None:
        """:meth:`retire` ``s``, then kmem_cache_destroy it (a KASAN oops there is the model's
        finding, already reported)."""
        self.retire(h, s, wait)
        try:
            k.slab.kmem_cache_destroy(s)
        except KasanOops:
            pass

    def use(self, rng: random.Random, fn: Callable[[Any], object]) -> bool:
        """Call ``fn`` on a published cache chosen with ``rng`` (none published: nothing,
        returns False), counted as a user meanwhile; a KASAN oops in ``fn`` is swallowed (the
        finding is already reported)."""
        with self.lock:
            hs = rng.choice(self.live) if self.live else None
            if hs is None:
                return False
            self.users[hs[0]] += 1
        try:
            fn(hs[1])
        except KasanOops:
            pass
        finally:
            with self.lock:
                self.users[hs[0]] -= 1
        return True

    def alloc_free(self, k: Kernel, rng: random.Random) -> bool:
        """:meth:`use` a published cache for one accounted allocation and its free."""
        sl = k.slab
        return self.use(rng, lambda s: sl.kmem_cache_free(s, sl.kmem_cache_alloc(s)))


def memcg_user_loop(k: Kernel, stop: threading.Event, name: str, uses: int,
                    use: Callable[[], object]) -> None:
    """Until ``stop``: create memcg ``name``, activate it, enter it, call ``use`` ``uses``
    times, go back to the root memcg and offline it (the stress driver's memcg churn)."""
    mc = k.memcg
    me = k.current()
    while not stop.is_set():
        m = mc.create(name)
        mc.memcg_activate_kmem(m)
        mc.attach(me, m)
        for _ in range(uses):
            use()
        mc.attach(me, mc.root)
        mc.offline(m)


@contextmanager
def fast_switching(interval: float = 1e-4) -> Iterator[None]:
    """Run the block with the interpreter switching threads every ``interval`` seconds (the
    randomized tests' way of getting more interleavings per second); restored afterwards."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_until_found(threads: list[KThread], stop: threading.Event, found: threading.Event,
                    limit: float, join: float = 10.0) -> float:
    """Let ``threads`` run until ``found`` is set or ``limit`` seconds pass, then set ``stop``
    and join each (bounded by ``join``). Returns the seconds waited, for the test to print."""
    t0 = time.monotonic()
    found.wait(limit)
    elapsed = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(join)
    return elapsed


def check_churn_outcome(k: Kernel, expect: bool, found: bool, detector: Iterable[str],
                        limit: float, label: str, elapsed: float) -> None:
    """Print what a randomized churn test found (``label``: kinds after ``elapsed`` s), then
    check it: with ``expect``, a finding came within ``limit`` and every finding is of a kind
    in ``detector``; without, there is no finding at all. Raises AssertionError otherwise."""
    kinds = {f.kind for f in k.findings}
    print(f"\n{label}: {sorted(kinds)} after {elapsed:.2f}s")
    if expect:
        if not found:
            raise AssertionError(f"not found within {limit}s")
        if not kinds <= set(detector):
            raise AssertionError([f.title for f in k.findings])
    elif kinds:
        raise AssertionError([f.text for f in k.findings])


def settle(k: Kernel) -> None:
    """Let every queued RCU callback and work run (creations, deactivations, releases,
    css_free), until nothing new appears: the leak check's quiesce()."""
    k.kmemleak.quiesce()
