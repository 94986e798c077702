"""lock_stat: per-class contention and hold-time statistics (kernel/locking/lockdep.c,
CONFIG_LOCK_STAT, Documentation/locking/lockstat.rst) and the /proc/lock_stat table.

Each lock instance owns a :class:`LockStat` that is only written while that lock is held
(exclusively; rwsem read statistics are written under the rwsem's internal lock), so updates
need no lock of their own and stay exact on free-threaded Python. A class's figures are the sum
of its live instances plus what dead instances left behind (merged when they are collected).

Differences: statistics are per class *name* (subclasses merged); "bounces" count acquisitions
on a different simulated CPU than the previous one; call sites are Python functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmemcg.core.report import site_text

if TYPE_CHECKING:
    from kmemcg.locking.lockdep import LockClass

MAX_POINTS = 4  # LOCKSTAT_POINTS


class LockStat:
    __slots__ = ("acquisitions", "contentions", "wait_min", "wait_max", "wait_total",
                 "hold_min", "hold_max", "hold_total", "holds", "con_bounces", "acq_bounces",
                 "last_cpu", "points", "contending", "dead")

    def __init__(self) -> None:
        self.acquisitions = 0
        self.contentions = 0
        self.wait_min = 0
        self.wait_max = 0
        self.wait_total = 0
        self.hold_min = 0
        self.hold_max = 0
        self.hold_total = 0
        self.holds = 0
        self.con_bounces = 0
        self.acq_bounces = 0
        self.last_cpu = -1
        self.points: dict[Any, int] = {}  # where tasks waited for this lock
        self.contending: dict[Any, int] = {}  # where the holder had taken it
        self.dead = False  # its lock is gone; figures final, to be folded into the class

    def wait(self, ns: int, cpu: int, point: Any, holder_site: Any) -> None:
        self.contentions += 1
        if self.last_cpu >= 0 and cpu != self.last_cpu:  # last_cpu is known with lock_stat on
            self.con_bounces += 1
        self.wait_total += ns
        if ns > self.wait_max:
            self.wait_max = ns
        if not self.wait_min or ns < self.wait_min:
            self.wait_min = ns
        if point is not None:
            self.points[point] = self.points.get(point, 0) + 1
        if holder_site is not None:
            self.contending[holder_site] = self.contending.get(holder_site, 0) + 1

    def hold(self, ns: int) -> None:
        self.holds += 1
        self.hold_total += ns
        if ns > self.hold_max:
            self.hold_max = ns
        if not self.hold_min or ns < self.hold_min:
            self.hold_min = ns

    def acquired(self, cpu: int) -> None:
        self.acquisitions += 1
        if cpu != self.last_cpu:
            if self.last_cpu >= 0:
                self.acq_bounces += 1
            self.last_cpu = cpu

    def merge(self, o: LockStat) -> None:
        self.acquisitions += o.acquisitions
        self.contentions += o.contentions
        self.wait_total += o.wait_total
        self.hold_total += o.hold_total
        self.holds += o.holds
        self.con_bounces += o.con_bounces
        self.acq_bounces += o.acq_bounces
        self.wait_max = max(self.wait_max, o.wait_max)
        self.hold_max = max(self.hold_max, o.hold_max)
        for attr in ("wait_min", "hold_min"):
            a, b = getattr(self, attr), getattr(o, attr)
            setattr(self, attr, min(a, b) if a and b else a or b)
        for attr in ("points", "contending"):
            d = getattr(self, attr)
            for k, v in list(getattr(o, attr).items()):
                d[k] = d.get(k, 0) + v

    def to_dict(self) -> dict[str, Any]:
        us = 1e-3
        return {
            "con_bounces": self.con_bounces, "contentions": self.contentions,
            "waittime_min_us": self.wait_min * us, "waittime_max_us": self.wait_max * us,
            "waittime_total_us": self.wait_total * us,
            "waittime_avg_us": self.wait_total * us / self.contentions if self.contentions else 0.0,
            "acq_bounces": self.acq_bounces, "acquisitions": self.acquisitions,
            "holdtime_min_us": self.hold_min * us, "holdtime_max_us": self.hold_max * us,
            "holdtime_total_us": self.hold_total * us,
            "holdtime_avg_us": self.hold_total * us / self.holds if self.holds else 0.0,
            "contention_points": {site_text(s): n for s, n in _top(self.points)},
            "contending_points": {site_text(s): n for s, n in _top(self.contending)},
        }


def _top(d: dict[Any, int]) -> list[tuple[Any, int]]:
    return sorted(list(d.items()), key=lambda kv: -kv[1])[:MAX_POINTS]


def register(cls: LockClass, stat: LockStat) -> None:
    with cls._stat_lock:
        cls._live.append(stat)


def retire(cls: LockClass, stat: LockStat) -> None:
    """A lock instance is gone: fold its figures into its class.

    Called from the lock's ``__del__``, which the cyclic garbage collector may run in any
    thread at any allocation, including in a thread that holds ``cls._stat_lock`` right now
    (inside :func:`class_stat`, :func:`register` or this function). So it never blocks: it
    marks the stat dead and folds it in only if the lock is free; otherwise the next
    :func:`class_stat` does. Until folded, a dead stat is still counted as a live one, so
    the class's figures are exact either way."""
    stat.dead = True
    if not cls._stat_lock.acquire(blocking=False):
        return
    try:
        _fold_dead(cls)
    finally:
        cls._stat_lock.release()


def _fold_dead(cls: LockClass) -> None:
    """Caller holds ``cls._stat_lock``: move dead instances' figures into ``_retired``."""
    for st in [s for s in cls._live if s.dead]:
        if cls._retired is None:
            cls._retired = LockStat()
        cls._retired.merge(st)
        cls._live.remove(st)


def class_stat(cls: LockClass) -> LockStat:
    """The class's figures: live instances plus retired ones (a racy read of live counters,
    as /proc/lock_stat is)."""
    total = LockStat()
    with cls._stat_lock:
        _fold_dead(cls)
        parts = list(cls._live) + ([cls._retired] if cls._retired else [])
    for s in parts:
        total.merge(s)
    return total


def proc_lock_stat(classes: list[LockClass], read_classes: dict[str, LockStat] | None = None
                   ) -> str:
    """The /proc/lock_stat table, sorted by contentions (then acquisitions)."""
    cols = ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
            "waittime-avg", "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max",
            "holdtime-total", "holdtime-avg")
    rule = "-" * (40 + 15 * len(cols))
    out = ["lock_stat version 0.4\n", rule + "\n",
           f"{'class name':>40}" + "".join(f"{c:>15}" for c in cols) + "\n", rule + "\n"]
    rows: list[tuple[str, LockStat]] = []
    for c in classes:
        if c.subclass or c.kind == "map":
            continue
        rows.append((c.base, class_stat(c)))
    for name, st in (read_classes or {}).items():
        rows.append((name, st))
    rows.sort(key=lambda r: (-r[1].contentions, -r[1].acquisitions, r[0]))
    for name, st in rows:
        if not st.acquisitions and not st.contentions:  # contentions alone: lock_stat off
            continue
        d = st.to_dict()
        vals = (d["con_bounces"], d["contentions"], d["waittime_min_us"], d["waittime_max_us"],
                d["waittime_total_us"], d["waittime_avg_us"], d["acq_bounces"],
                d["acquisitions"], d["holdtime_min_us"], d["holdtime_max_us"],
                d["holdtime_total_us"], d["holdtime_avg_us"])
        out.append("\n" + f"{name + ':':>40}" + "".join(
            f"{v:>15}" if isinstance(v, int) else f"{v:>15.2f}" for v in vals) + "\n")
        for title, points in (("contention point", d["contention_points"]),
                              ("contending from", d["contending_points"])):
            if points:
                out.append(f"{'-' * len(name):>40}\n")
                for site, n in points.items():
                    out.append(f"{name:>40}{n:>15}          [{title}] {site}\n")
    out.append("\n")
    return "".join(out)
