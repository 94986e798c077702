"""The stress drivers' shared world and the roles its threads play.

The drivers behave like correct kernel users: a cache is destroyed only by its owner, after
every driver that was using it let go and every object it handed out was freed. So on a fixed
kernel no finding can come from the drivers themselves; any finding is the kernel model's.

Driver-side bookkeeping uses plain ``threading`` locks on purpose: it is the test harness, not
the kernel, and must not add lock classes or dependencies to lockdep's graph.

Roles (each driver thread plays one; ``--mix`` weights them):

=============  ==========================================================================
allocator      alloc / free on live root caches (frees of objects other threads allocated),
               migration between CPUs
root_churn     create a cache (often merging into an existing one), use it, free all,
               destroy; sometimes a SLAB_TYPESAFE_BY_RCU cache. Before an accounted
               cache's destroy, a memcg using it is removed (a service's teardown)
rcu_reader     SLAB_TYPESAFE_BY_RCU lookups: find under rcu_read_lock, lock, revalidate
rcu_writer     insert / delete objects in the TYPESAFE tables; synchronize / barrier
shrinker       kmem_cache_shrink on live caches
hotplug        cpu_down / cpu_up
cgroup_churn   create memcgs, activate kmem, offline them once their tasks moved away (moving
               them out itself half of the time)
=============  ==========================================================================

Allocators move themselves between memcgs (cgroup.procs), so SLAB_ACCOUNT caches get per-memcg
children created, charged, deactivated and destroyed under the same load.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kmemcg import Kernel
from kmemcg.core.instrument import phase_draw
from kmemcg.core.kasan import KasanOops
from kmemcg.core.sched import RunQueue
from kmemcg.mm.slub import SLAB_ACCOUNT, SLAB_HWCACHE_ALIGN, SLAB_TYPESAFE_BY_RCU
from kmemcg.mm.typesafe import TypesafeTable, typesafe_delete, typesafe_insert, typesafe_lookup

SIZES = (32, 64, 96, 128, 192, 256)  # few sizes: creations often merge
TYPESAFE_SIZES = (1024,)
ACCOUNT_SIZES = (96, 192)
NAMES = ("dentry", "inode", "filp", "buffer_head", "sock", "task_struct", "vm_area", "anon_vma")
MAX_LIVE = 12
MAX_OBJS = 64
RESERVE = 2  # objects kept per (memcg, cache) for the memcg's offline (World.charged)
FLUSH_PROB = 0.5  # of retiring a memcg with kept objects after a CPU offline/online cycle
DRAIN_DELAY = 0.002  # seconds after an offline its kept objects are freed, at most
KEYS = 12  # few keys per table: readers often race the writer deleting theirs
LONG_LIVED = 0.25  # of accounted and TYPESAFE caches: kept LONG_LIFE s, as a module's caches are
LONG_LIFE = (1.0, 4.0)
LONG_LIVED_ACCOUNT_SIZE = ACCOUNT_SIZES[-1]  # the accounted caches that may live long
TEARDOWN = 1.0  # share of accounted caches' destroys preceded by a teardown (see teardown())


@dataclass
class Entry:
    """One kmem_cache_create() a driver made: the cache it got (maybe an alias), who uses it,
    and the objects allocated from it that are not freed yet."""

    cache: Any
    typesafe: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    dying: bool = False
    objs: list[Any] = field(default_factory=list)
    table: TypesafeTable | None = None
    keys: set[int] = field(default_factory=set)  # published in ``table``
    busy: set[int] = field(default_factory=set)  # keys a writer is working on
    # ids of objects on ``objs`` that random frees leave alone: kept for their memcg's offline
    # (World.charged); the owner still frees them at destroy, and the run's cleanup
    reserved: set[int] = field(default_factory=set)
    keep_until: float = 0.0  # time.monotonic() before which the owner does not destroy it


class DriverLock:
    """The drivers' own bookkeeping lock when a run queue is on, held like a spinlock: its
    holder keeps its CPU (kmemcg.core.sched) even if a model call made under it sleeps in a
    race window, so the tasks that wait for it, which keep theirs, never wait for a holder
    that has none."""

    def __init__(self, k: Kernel, rq: RunQueue) -> None:
        self._k = k
        self._rq = rq
        self._raw = threading.Lock()

    def __enter__(self) -> None:
        self._raw.acquire()
        self._rq.preempt_disable(self._k.current())

    def __exit__(self, *exc: object) -> None:
        self._rq.preempt_enable(self._k.current())
        self._raw.release()


class World:
    def __init__(self, k: Kernel, seed: int, swarm: float = 0.0) -> None:
        self.k = k
        self.seed = seed
        self.swarm = Swarm(seed, swarm)
        # a plain lock unless a run queue needs to know who holds it (DriverLock)
        self.lock = DriverLock(k, k.rq) if k.rq is not None else threading.Lock()
        self.entries: list[Entry] = []
        self.memcgs: list[Any] = []  # online, kmem-active memcgs drivers may move into
        self.retiring: list[Any] = []  # taken out of ``memcgs``: offlined once empty
        self.tasks: list[Any] = []  # every driver's task (cgroup churners move them out)
        self.stop = threading.Event()
        # burst memcgs just activated (a subset of ``memcgs``): allocators crowd into them so
        # several creations of one (memcg, root) slot queue up while the arrays relocate
        self.hot: list[Any] = []
        # objects allocated from a memcg's children, by memcg: (entry, object). When the memcg
        # goes offline its churner frees them at once (the owner's entry keeps them too: the
        # first to take one out of ``Entry.objs`` frees it), so the last page of a dead child
        # is freed while its destroy work is queued (catalog bug 8's window)
        self.charged: dict[int, list[tuple[Entry, Any]]] = {}
        self.charged_cpus: dict[int, set[int]] = {}  # the CPUs the kept objects came from
        self.drain: list[tuple[float, list[tuple[Entry, Any]]]] = []  # (due, kept objects)
        self.next_memcg = 0.0  # monotonic time of the next paced memcg creation (pace_memcg)

    def pace_memcg(self) -> bool:
        """Wait for the next slot of MEMCG_RATE (all churners together); True if the run is
        stopping. Without a pace the churn rate followed the scheduler: 64 threads made about
        70 memcgs/s when all were runnable and 130-270/s on the run queue (woken nappers go
        first), where every memcg's creations outran the creation path (v3.6: a root destroy
        waited over 10 s in flush_workqueue(memcg_kmem_cache); v3.13: hundreds of creation
        works on memcg_cache_mutex)."""
        with self.lock:
            now = time.monotonic()
            due = max(self.next_memcg, now)
            self.next_memcg = due + 1.0 / MEMCG_RATE
        return due > now and self.nap(due - now)

    def nap(self, seconds: float) -> bool:
        """A driver's pause inside an operation (msleep): off the CPU, so that whoever it
        waits for can run (kmemcg.core.sched). True if the run is stopping."""
        with self.k.off_cpu(self.k.current()):
            return self.stop.wait(seconds)

    # -- the owner protocol ------------------------------------------------------------------
    def grab(self, rng: random.Random, typesafe: bool | None = None,
             account: bool = False) -> Entry | None:
        with self.lock:
            live = [e for e in self.entries
                    if not e.dying and (typesafe is None or e.typesafe == typesafe)
                    and (not account or e.cache.flags & SLAB_ACCOUNT)]
            if not live:
                return None
            e = rng.choice(live)
            e.users += 1
            return e

    def put(self, e: Entry) -> None:
        with self.lock:
            e.users -= 1

    def retire(self, e: Entry) -> bool:
        """Mark ``e`` dying and wait until nobody uses it (bounded: the run may be stopping)."""
        with self.lock:
            e.dying = True
        for _ in range(2000):
            with self.lock:
                if e.users == 0:
                    self.entries.remove(e)
                    return True
            if self.nap(0.001):
                break
        return False


class Swarm:
    """Swarm testing over the roles (Groce et al., ISSTA 2012): time is cut into PHASE-second
    phases, and in each phase every role is *quiet* (its threads idle) with probability
    ``quiet``, by a hash of (seed, phase, role). A run then passes through many smaller mixes:
    a race between two roles is not drowned by the others (32 of 64 default threads are RCU
    readers and writers, 26 allocators, and the GIL is shared by all), and one role's work
    does not always tidy up what another's race left (the shrinkers, the readers' grace
    periods). Phase 0 runs every role."""

    PHASE = 1.0

    def __init__(self, seed: int, quiet: float) -> None:
        self.seed = seed
        self._quiet = quiet
        self._t0 = time.monotonic()

    def quiet(self, role: str, now: float | None = None) -> bool:
        if not self._quiet:
            return False
        ph = int(((time.monotonic() if now is None else now) - self._t0) / self.PHASE)
        return ph > 0 and phase_draw(self.seed, ph, role) < self._quiet


# ------------------------------------------------------------------------ role operations
Op = Callable[[World, random.Random, Counter], None]


def op_allocator(w: World, rng: random.Random, ops: Counter) -> None:
    if w.hot and rng.random() < 0.3:
        hot_alloc(w, rng, ops)
        return
    if w.drain and rng.random() < 0.5:
        drain_one(w, ops)
    e = w.grab(rng, typesafe=False)
    if e is None:
        return
    sl = w.k.slab
    try:
        if rng.random() < 0.55 and len(e.objs) < MAX_OBJS:
            obj = sl.kmem_cache_alloc(e.cache)
            ops["alloc"] += 1
            note_charged(w, e, obj)  # first: once on e.objs, anybody may free it
            with e.lock:
                e.objs.append(obj)
        else:
            with e.lock:
                i = rng.randrange(len(e.objs)) if e.objs else -1
                obj = None if i < 0 or id(e.objs[i]) in e.reserved else e.objs.pop(i)
            if obj is not None:  # very likely allocated by another thread
                sl.kmem_cache_free(e.cache, obj)
                ops["free"] += 1
        if rng.random() < 0.05:
            w.k.hotplug.migrate()
            ops["migrate"] += 1
    finally:
        w.put(e)
    if rng.random() < 0.05:
        move_self(w, rng, ops)


def note_charged(w: World, e: Entry, obj: Any) -> None:
    """Remember an object that went to a per-memcg child, under the memcg we are in; the
    first RESERVE of each (memcg, entry) are kept from random frees until the offline."""
    if obj.cache is e.cache:
        return
    m = w.k.current().memcg  # racy read (a churner may move us): a hint, not a claim
    if m is None:
        return
    with w.lock:
        if m not in w.memcgs:
            return  # being retired: its offline may have collected already
        lst = w.charged.setdefault(id(m), [])
        if sum(1 for x, _ in lst if x is e) >= RESERVE:
            return
        lst.append((e, obj))
        w.charged_cpus.setdefault(id(m), set()).add(w.k.hotplug.this_cpu())
    with e.lock:  # before obj is on e.objs (see the caller)
        e.reserved.add(id(obj))


def hot_alloc(w: World, rng: random.Random, ops: Counter) -> None:
    """Enter a just-activated burst memcg and allocate from an accounted root there: other
    allocators do the same meanwhile, so the first allocations miss together and queue
    several creations of one slot, while the burst relocates the arrays (catalog bug 7).
    The objects are kept: freed later by anyone, or at the memcg's offline."""
    with w.lock:
        if not w.hot:
            return
        target = rng.choice(w.hot)
    move_self(w, rng, ops, target)
    if w.k.current().memcg is not target:
        return
    e = w.grab(rng, typesafe=False, account=True)
    if e is None:
        return
    try:
        for _ in range(rng.randint(1, 3)):
            if len(e.objs) >= MAX_OBJS:
                break
            obj = w.k.slab.kmem_cache_alloc(e.cache)
            ops["alloc"] += 1
            note_charged(w, e, obj)  # first: once on e.objs, anybody may free it
            with e.lock:
                e.objs.append(obj)
    finally:
        w.put(e)


def free_charged(w: World, m: Any, rng: random.Random, ops: Counter, before: bool) -> None:
    """The objects kept from ``m``'s children: the last free of a child must race its
    destroy work, queued at offline (catalog bug 8). ``before`` the offline, half of them go
    to other drivers (``w.drain``: on other CPUs, as tasks dropping their last references
    while the admin runs rmdir), and half of the time the admin cycles the CPUs they were
    allocated on; after it, we free the rest at once."""
    with w.lock:
        items = w.charged.pop(id(m), [])
        cpus = w.charged_cpus.pop(id(m), set())
        if before:
            keep = [x for x in items if rng.random() < 0.5]
            w.charged[id(m)] = keep
            now = [x for x in items if all(x is not y for y in keep)]
            if now:
                w.drain.append((time.monotonic() + rng.random() * DRAIN_DELAY, now))
    if not before:
        free_kept(w, items, ops)
    elif items and rng.random() < FLUSH_PROB:
        # a CPU offline/online cycle flushes the dead CPU's slabs: the children's last pages
        # are no cpu slabs any more, so their last free discards them and nr_pages reaches
        # 0 while the destroy work is queued
        hp = w.k.hotplug
        for cpu in sorted(cpus - {0}):
            if hp.cpu_online(cpu) and hp.cpu_down(cpu) == 0:
                hp.cpu_up(cpu)
                ops["cpu_hotplug"] += 2


def drain_one(w: World, ops: Counter) -> None:
    """Free a batch of kept objects whose time has come (see free_charged)."""
    now = time.monotonic()
    with w.lock:
        for i, (due, _) in enumerate(w.drain):
            if due <= now:
                items = w.drain.pop(i)[1]
                break
        else:
            return
    free_kept(w, items, ops)


def free_kept(w: World, items: list[tuple[Entry, Any]], ops: Counter) -> None:
    """Free kept objects whose owner is not destroying their cache (it frees them then)."""
    for e, obj in items:
        with w.lock:
            if e.dying:
                continue  # its owner frees it (and holds no lock we need)
            e.users += 1
        try:
            with e.lock:
                e.reserved.discard(id(obj))
                for i, x in enumerate(e.objs):
                    if x is obj:
                        del e.objs[i]
                        break
                else:
                    continue  # its owner freed it already
            w.k.slab.kmem_cache_free(e.cache, obj)
            ops["free"] += 1
        finally:
            w.put(e)


def move_self(w: World, rng: random.Random, ops: Counter, target: Any = None) -> None:
    """Write ourselves into another memcg's cgroup.procs (or the root's)."""
    mc = w.k.memcg
    with w.lock:
        if target is not None and target not in w.memcgs:
            return  # retired meanwhile
        if target is None:
            target = rng.choice(w.memcgs) if w.memcgs and rng.random() < 0.8 else mc.root
        # the open cgroup.procs file's reference: a memcg still on w.memcgs is not offline
        # yet (a churner takes it off first), so it cannot be freed while we write to it
        mc.css_get(target)
    try:
        mc.attach(w.k.current(), target)
        ops["memcg_attach"] += 1
    except ValueError:  # it went offline meanwhile: like -ENOENT from cgroup.procs
        pass
    finally:
        mc.css_put(target)


def leave_retiring(w: World) -> None:
    """A driver in a memcg that is being retired moves back to the root."""
    mc = w.k.memcg
    me = w.k.current()
    with w.lock:
        retiring = me.memcg is not None and me.memcg in w.retiring
    if retiring:
        mc.attach(me, mc.root)


def op_root_churn(w: World, rng: random.Random, ops: Counter) -> None:
    k, sl = w.k, w.k.slab
    with w.lock:
        n = len(w.entries)
    if n < MAX_LIVE and (n < 3 or rng.random() < 0.5):
        typesafe = rng.random() < 0.25
        flags = SLAB_TYPESAFE_BY_RCU if typesafe else rng.choice(
            (0, SLAB_HWCACHE_ALIGN, SLAB_ACCOUNT, SLAB_ACCOUNT))
        # TYPESAFE caches get big objects: few per slab, so slabs empty (and their pages go
        # back to the page allocator) often: that is where seed 003's bugs live. Accounted
        # caches get two sizes, so they often merge: the memcg side's alias bugs need an
        # accounted root with several users and children.
        size = rng.choice(TYPESAFE_SIZES if typesafe else
                          ACCOUNT_SIZES if flags & SLAB_ACCOUNT else SIZES)
        s = sl.kmem_cache_create(rng.choice(NAMES), size, 0, flags)
        ops["cache_create"] += 1
        e = Entry(s, typesafe)
        if (typesafe or size == LONG_LIVED_ACCOUNT_SIZE) and rng.random() < LONG_LIVED:
            # most caches live tens of milliseconds here; a few live seconds: the state a
            # destroy of one alias leaves in a merged accounted cache lasts (catalog bug 17's
            # dying root), and TYPESAFE readers and writers churn one cache's slab pages long
            # enough (bug 3). Not the plain ones, nor accounted ones of the other size: new
            # caches would merge into them instead of racing the destroy of their last alias
            # (bugs 5 and 12)
            e.keep_until = time.monotonic() + rng.uniform(*LONG_LIFE)
        if typesafe:
            e.table = TypesafeTable(k, f"table_{s.name}")
        with w.lock:
            w.entries.append(e)
        return
    with w.lock:
        # an owner whose cache still has objects kept for a memcg's offline (bug 8's
        # window) mostly keeps it a while longer: caches live tens of milliseconds otherwise
        now = time.monotonic()
        live = [e for e in w.entries if not e.dying and e.keep_until <= now
                and (not e.reserved or rng.random() < 0.2)]
        e = rng.choice(live) if live else None
        if e is not None:
            e.dying = True  # ours to destroy
    if e is None or not w.retire(e):
        return
    if e.table is not None:
        for key in list(e.keys):
            typesafe_delete(k, e.cache, e.table, key)
    for obj in e.objs:
        sl.kmem_cache_free(e.cache, obj)
        ops["free"] += 1
    e.objs.clear()
    if e.cache.flags & SLAB_ACCOUNT and rng.random() < TEARDOWN:
        teardown(w, e, rng, ops)
    w.k.window("stress:before_destroy")
    sl.kmem_cache_destroy(e.cache)
    ops["cache_destroy"] += 1


def teardown(w: World, e: Entry, rng: random.Random, ops: Counter) -> None:
    """A service going away: its objects were freed, its container is removed now (rmdir of
    a memcg with a child of ``e``'s cache), and its module unloads (``e`` destroyed by the
    caller right after). The "destroy after rmdir" of a264df74df38 (catalog bug 16): the
    root's destroy meets the child's deactivation on its way through an RCU callback and a
    work (bug 11 too)."""
    rp = e.cache.memcg_params
    if rp is None:  # v5.9: no per-memcg children
        return
    with w.k.slab.slab_mutex:  # as memory.kmem.slabinfo lists them
        using = {id(c.memcg_params.memcg) for c in rp.children}
    with w.lock:
        users = [m for m in w.memcgs if id(m) in using]
        if not users:
            return
        m = rng.choice(users)
        w.memcgs.remove(m)  # claimed: as a churner claims it (one rmdir succeeds)
    rmdir(w, m, rng, ops, evicting=True)


def op_rcu_reader(w: World, rng: random.Random, ops: Counter) -> None:
    e = w.grab(rng, typesafe=True)
    if e is None:
        return
    try:
        key = rng.randrange(KEYS)
        obj = typesafe_lookup(w.k, e.table, key)
        ops["rcu_lookup"] += 1
        if obj is not None:
            try:
                assert obj.key == key
            finally:
                obj.lock.unlock()
    finally:
        w.put(e)


def op_rcu_writer(w: World, rng: random.Random, ops: Counter) -> None:
    r = rng.random()
    if r < 0.1:
        w.k.rcu.synchronize()
        ops["rcu_sync"] += 1
        return
    if r < 0.15:
        w.k.rcu.barrier()
        ops["rcu_barrier"] += 1
        return
    e = w.grab(rng, typesafe=True)
    if e is None:
        return
    try:
        key = rng.randrange(KEYS)
        with e.lock:  # claim the key: one writer per key at a time
            if key in e.busy:
                return
            e.busy.add(key)
            present = key in e.keys
        try:
            if present:
                typesafe_delete(w.k, e.cache, e.table, key)
                with e.lock:
                    e.keys.discard(key)
                ops["free"] += 1
            else:
                typesafe_insert(w.k, e.cache, e.table, key, payload=rng.random())
                with e.lock:
                    e.keys.add(key)
                ops["alloc"] += 1
        finally:
            with e.lock:
                e.busy.discard(key)
    finally:
        w.put(e)


MAX_MEMCGS = 6
MEMCG_RATE = 80.0  # memcgs/s the cgroup churners create at most, all together (not bursts)
BURST_PROB = 0.01  # per cgroup-churn step
BURST_MAX = 200  # live memcgs a burst may bring the pool to
HOT_MEMCGS = 3  # burst memcgs allocators crowd into before a relocation
HOT_LEAD = 0.02  # seconds they do so before the relocation (and after it)


def activate(mc: Any, m: Any, ops: Counter) -> bool:
    """Turn kmem accounting on for ``m`` (a write of memory.kmem.limit_in_bytes). It fails
    when growing the memcg_caches arrays failed (failslab): ``m`` then stays a memcg without
    kmem accounting, whose tasks allocate from the root caches."""
    if mc.memcg_activate_kmem(m) >= 0:
        return True
    ops["kmem_activate_failed"] += 1
    return False


def evict(w: World, m: Any) -> None:
    """Write every driver still in ``m`` into the root's cgroup.procs. A driver may be between
    memcg_kmem_get_cache() and its allocation right now: seed 002's window (catalog bug 9)."""
    mc = w.k.memcg
    with w.lock:
        tasks = list(w.tasks)
    for t in tasks:
        if w.stop.is_set():
            return  # drivers are exiting: do not move a task that is going away
        if t.memcg is m:  # racy read: attach() itself is serialised by cgroup_mutex
            mc.attach(t, mc.root)


def burst(w: World, ops: Counter) -> None:
    """Create kmem-active memcgs until the kmemcg ids outgrow the root caches' memcg_caches
    arrays, so they are relocated (memcg_update_all_caches) while creations run: the arrays
    only ever grow, so without bursts a run relocates them a few times during warm-up only
    (the 3.13 races of catalog bugs 7 and 13 live there). Bounded by BURST_MAX live memcgs;
    the new memcgs join the pool and are retired one by one as usual.

    Before the activation that will relocate, the last few memcgs are made *hot* for a few
    milliseconds: allocators crowd into them and allocate from the accounted roots, so
    creations of fresh slots (several per slot) are queued when the relocation takes
    slab_mutex between two of them (bug 7: the second checks the slot in the new, still
    empty array while the first's child waits in the old one to be copied)."""
    mc = w.k.memcg
    with w.lock:
        room = BURST_MAX - len(w.memcgs) - len(w.retiring)
    before = mc.nr_cache_ids
    if len(mc._ids) + room < before:
        # Out of reach: the ids this burst may take cannot fill the arrays (they only grow).
        # It would only add memcgs, each queueing a creation per accounted root allocated
        # from in it: load on memcg_cache_mutex, which every creation takes, and nothing for
        # the relocation races.
        return
    recent: list[Any] = []
    try:
        for _ in range(max(0, room)):
            if w.stop.is_set() or mc.nr_cache_ids != before:
                break
            # the next activation relocates when every id below nr_cache_ids is taken (an
            # unlocked peek at the id allocator: only a hint for when to heat up)
            if len(recent) >= HOT_MEMCGS and len(mc._ids) + 1 >= mc.nr_cache_ids:
                with w.lock:
                    w.hot = [m for m in recent[-HOT_MEMCGS:] if m in w.memcgs]
                w.nap(HOT_LEAD)
            m = mc.create(f"burst{ops['memcg_create']}")
            if activate(mc, m, ops):
                recent.append(m)
            with w.lock:
                w.memcgs.append(m)
            ops["memcg_create"] += 1
        if w.hot:
            w.nap(HOT_LEAD)  # the creations run on while the new arrays fill
    finally:
        with w.lock:
            w.hot = []


def rmdir(w: World, m: Any, rng: random.Random, ops: Counter, evicting: bool) -> None:
    """Offline ``m``, claimed by the caller (off ``w.memcgs`` and ``w.retiring``); put it back
    on ``w.retiring`` if a task is still in it. ``evicting``: move its tasks out first, as an
    admin does before rmdir (else they were asked to leave and do so by themselves)."""
    if evicting:
        evict(w, m)
    free_charged(w, m, rng, ops, before=True)
    if w.k.memcg.offline(m) == 0:
        ops["memcg_offline"] += 1
        free_charged(w, m, rng, ops, before=False)
        return
    with w.lock:
        w.retiring.append(m)  # still busy: later, by whoever claims it then


def pick_retiree(w: World, rng: random.Random) -> int:
    """Caller holds ``w.lock``: the index in ``w.memcgs`` of the memcg to retire. Half of the
    time the one whose children hold the most kept objects: the root caches live some tens
    of milliseconds only, so that memcg goes offline while they still do (bug 8)."""
    n = len(w.memcgs)
    if w.charged and rng.random() < 0.5:
        best, most = -1, 0
        for i, m in enumerate(w.memcgs):
            k = sum(1 for e, _ in w.charged.get(id(m), ()) if not e.dying)
            if k > most:
                best, most = i, k
        if best >= 0:
            return best
    return rng.randrange(n)


def op_cgroup_churn(w: World, rng: random.Random, ops: Counter) -> None:
    """Several churners may run: each memcg is claimed by one (taken off the shared lists
    under ``w.lock``) before it is offlined, as only one rmdir of a directory succeeds."""
    mc = w.k.memcg
    with w.lock:
        claimed, w.retiring = w.retiring, []
    for m in claimed:  # offline those whose tasks have all moved away
        rmdir(w, m, rng, ops, evicting=rng.random() < 0.5)
    if rng.random() < BURST_PROB:
        burst(w, ops)
    with w.lock:
        n = len(w.memcgs)
        grow = n < MAX_MEMCGS and (n < 2 or rng.random() < 0.5)
        m = None if grow or not n else w.memcgs.pop(pick_retiree(w, rng))
        if m is not None:
            w.retiring.append(m)
    if grow:
        if w.pace_memcg():
            return
        m = mc.create(f"cg{rng.randrange(10**6)}")
        activate(mc, m, ops)
        with w.lock:
            w.memcgs.append(m)
        ops["memcg_create"] += 1
    w.nap(0.002)


CHILD_SHRINK = 0.5  # share of shrinker steps that shrink a root's children (online memcgs)


def op_shrinker(w: World, rng: random.Random, ops: Counter) -> None:
    e = w.grab(rng)
    if e is None:
        return
    try:
        if rng.random() < CHILD_SHRINK:
            shrink_children(w, e.cache)
        else:
            w.k.slab.kmem_cache_shrink(e.cache)
        ops["cache_shrink"] += 1
    finally:
        w.put(e)
    w.nap(0.002)


def shrink_children(w: World, root: Any) -> None:
    """Shrink the per-memcg children of ``root`` whose memcg is online, as a write to their
    sysfs ``shrink`` would. Those of offline memcgs are left to the kernel's own paths (the
    destroy work, the deactivation): shrinking them here would do the kernel's job for it and
    hide a kernel that forgot it (bug 17's children, never deactivated, keep empty slabs
    that pin their memcgs). Under cpus + slab_mutex, as the deactivation work shrinks them: a
    child's destruction takes slab_mutex, so none is freed under us (the sysfs path holds a
    kernfs active reference instead, which the model does not have); ``online`` is read
    unlocked (a child pins its memcg, and a stale read only picks one child more or less).
    Every memcg design keeps the root's ``children`` list under slab_mutex."""
    sl = w.k.slab
    rp = root.memcg_params
    if rp is None:  # not a memcg-aware root (v5.9 has no per-memcg children at all)
        return
    with sl.cpus_and_slab_mutex():
        for c in list(rp.children):
            if c.memcg_params.memcg.online:
                sl.slub.kmem_cache_shrink(c)


def op_hotplug(w: World, rng: random.Random, ops: Counter) -> None:
    hp = w.k.hotplug
    cpu = rng.randrange(1, hp.nr_cpus) if hp.nr_cpus > 1 else 0
    if cpu == 0:
        w.nap(0.01)
        return
    rc = hp.cpu_down(cpu) if hp.cpu_online(cpu) else hp.cpu_up(cpu)
    if rc == 0:
        ops["cpu_hotplug"] += 1
    w.nap(0.002)


ROLES: dict[str, Op] = {
    "allocator": op_allocator,
    "root_churn": op_root_churn,
    "rcu_reader": op_rcu_reader,
    "rcu_writer": op_rcu_writer,
    "shrinker": op_shrinker,
    "hotplug": op_hotplug,
    "cgroup_churn": op_cgroup_churn,
}

WORKLOADS: dict[str, dict[str, float]] = {
    "default": {"allocator": 40, "root_churn": 12, "rcu_reader": 20, "rcu_writer": 12,
                "shrinker": 8, "hotplug": 4, "cgroup_churn": 6},
    "churn": {"allocator": 30, "root_churn": 35, "rcu_writer": 10, "rcu_reader": 10,
              "shrinker": 5, "hotplug": 5, "cgroup_churn": 5},
    "rcu": {"rcu_reader": 50, "rcu_writer": 30, "root_churn": 15, "hotplug": 5},
    "hotplug": {"allocator": 40, "root_churn": 20, "rcu_writer": 10, "shrinker": 10,
                "hotplug": 20},
}


def assign_roles(mix: dict[str, float], threads: int) -> list[str]:
    """Split ``threads`` over the roles by weight (largest remainders); every role with a
    positive weight gets at least one thread when there are enough threads."""
    roles = [r for r, wgt in mix.items() if wgt > 0]
    total = sum(mix[r] for r in roles)
    quota = {r: threads * mix[r] / total for r in roles}
    n = {r: int(q) for r, q in quota.items()}
    if threads >= len(roles):
        for r in roles:
            n[r] = max(n[r], 1)
    while sum(n.values()) > threads:
        r = max(n, key=lambda x: n[x])
        n[r] -= 1
    for r in sorted(roles, key=lambda x: quota[x] - int(quota[x]), reverse=True):
        if sum(n.values()) >= threads:
            break
        n[r] += 1
    out = [r for r in roles for _ in range(n[r])]
    return out[:threads]


def run_role(w: World, role: str, rng: random.Random, ops: Counter) -> None:
    """A driver thread's loop. An oops (KASAN) ends the operation, not the driver, as the
    kernel goes on after an oops in one task; it is counted."""
    op = ROLES[role]
    task = w.k.current()
    with w.lock:
        w.tasks.append(task)
    rq = w.k.rq
    try:
        while not w.stop.is_set():
            if w.swarm.quiet(role):
                leave_retiring(w)
                if rq is not None:
                    rq.give(task)  # idle: off the CPU
                w.stop.wait(0.02)
                continue
            if rq is not None:
                rq.cond_resched(task)  # a scheduling point between two operations
            try:
                op(w, rng, ops)
                leave_retiring(w)
            except KasanOops:
                ops["oops"] += 1
    finally:
        if rq is not None:
            rq.give(task)
