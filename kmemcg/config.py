"""Kernel configuration: which design the model runs (a *preset*, named after the release whose
behaviour it models) and which historical bugs are switched back on.

A bug switch restores the historical code path at the exact point where the fix changed it
(the code tests ``k.config.bug("name")`` there and nowhere else). Switches combine with any
preset; a bug whose historical path needs its era's CPU-hotplug design (catalog
``requires_hotplug``) brings that design along unless ``hotplug=`` is given. The
checkers never read the configuration: they find bugs from behaviour alone.

Presets and the catalog bugs each carries (fixing commits in :mod:`kmemcg.catalog`):

========  =============================================================================
preset         design and bugs
=============  ==========================================================================
v3.6           2012 CPU-hotplug refcount lock; rcu_barrier() takes get_online_cpus() (commit
               1331e7a1bbe1); kmem_cache_destroy holds slab_mutex across rcu_barrier():
               bug ``destroy_rcu_barrier_under_slab_mutex`` (seed 004)
v3.13          memcg design of 3.8-3.15: per-memcg slab_caches_mutex, creation under
               memcg_cache_mutex on the system workqueue, destroy work with ``dead`` and
               ``nr_pages``; bugs 7, 8, 9, 10 and the 3.8-3.15 extras (catalog)
v3.16          3.16-3.18: one global memcg_slab_mutex (seed 001); destroy drops slab_mutex
               with the alias count at zero to destroy memcg children: bugs ``alias_race``
               (Dec 2014), 9 and 10
v4.17          asynchronous memcg cache creation and deactivation, and a root destroy that waits
               for neither: bug ``root_destroy_without_flush`` (seed 000; fixed by 92ee383f6daa)
v4.18          the merged fix 92ee383f6daa (root ``dying`` + flush_memcg_workqueue, set before
               the alias check)
v4.18-refcount seed 000's alternative fix: a lifetime refcount on the root next to the alias
               count, which kmem_cache_destroy() decrements without slab_mutex: bug 12
v5.3           percpu_ref-counted child caches (f0a3a24b532d): a264df74df38 and d38a2b7a9c93
               not yet applied
v5.9           no per-memcg caches: objects charged to an obj_cgroup
fixed          every fix applied (default)
=============  ==========================================================================

``memcg`` names the per-memcg cache design a preset runs (kmemcg.mm.memcg_designs); like the
hotplug design, a switched-on bug brings the design its code path lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmemcg.catalog import BY_NAME, CATALOG

HOTPLUG_2012 = "2012"
HOTPLUG_PERCPU_RWSEM = "percpu_rwsem"
HOTPLUG_DESIGNS = (HOTPLUG_2012, HOTPLUG_PERCPU_RWSEM)

# The per-memcg kmem cache designs (docs/memcg-eras.md), by the release that introduced them
MEMCG_V313 = "v3.13"  # 3.8-3.15: slab_caches_mutex, destroy work, dead + nr_pages
MEMCG_V316 = "v3.16"  # 3.16-3.18: global memcg_slab_mutex
MEMCG_V4 = "v4"  # 3.19-5.2: css-pinned children, async deactivation (4.11), dying (4.18)
MEMCG_V4_REFCOUNT = "v4-refcount"  # seed 000's alternative: root lifetime refcount
MEMCG_V53 = "v5.3"  # 5.3-5.8: percpu_ref-counted children
MEMCG_V59 = "v5.9"  # 5.9+: obj_cgroup, no per-memcg caches
# The hotplug design a memcg design needs (3.13 and 3.16 nest get_online_cpus() on their
# destroy paths, which only the 2012 reader count allows)
MEMCG_HOTPLUG = {MEMCG_V313: HOTPLUG_2012, MEMCG_V316: HOTPLUG_2012}
MEMCG_DESIGNS = (MEMCG_V313, MEMCG_V316, MEMCG_V4, MEMCG_V4_REFCOUNT, MEMCG_V53, MEMCG_V59)


@dataclass(frozen=True)
class Preset:
    name: str
    release: str  # what it models
    hotplug: str
    memcg: str
    bugs: frozenset[str]
    doc: str


# Every switchable bug, by name: the catalog is the one list (and says which presets carry
# each bug, so a preset's bug set below is derived from it).
BUG_NAMES = tuple(BY_NAME)


def _carried(preset: str) -> frozenset[str]:
    return frozenset(b.name for b in CATALOG if preset in b.presets)


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("v3.6", "Linux 3.6 (2012)", HOTPLUG_2012, MEMCG_V4, _carried("v3.6"),
               "kmem_cache_destroy() holds slab_mutex across rcu_barrier(), which takes "
               "get_online_cpus() since 1331e7a1bbe1; fixed by 210ed9defffc (3.7)."),
        Preset("v3.13", "Linux 3.8-3.15 (2013)", HOTPLUG_2012, MEMCG_V313, _carried("v3.13"),
               "Per-memcg slab_caches_mutex (activate_kmem_mutex -> slab_mutex -> "
               "memcg::slab_caches_mutex), creation under memcg_cache_mutex, offline marks "
               "caches dead and queues destroy works, the last freed page may queue one too."),
        Preset("v3.16", "Linux 3.16-3.18 (2014)", HOTPLUG_2012, MEMCG_V316, _carried("v3.16"),
               "One global memcg_slab_mutex (activate_kmem_mutex -> memcg_slab_mutex -> "
               "slab_mutex, seed 001); kmem_cache_destroy() drops slab_mutex after the alias "
               "count reached zero to destroy the children, and find_mergeable() still "
               "offers the doomed cache to kmem_cache_create()."),
        Preset("v4.17", "Linux 4.11-4.17 (2018)", HOTPLUG_PERCPU_RWSEM, MEMCG_V4,
               _carried("v4.17"),
               "Asynchronous memcg cache deactivation (call_rcu, then a work) and creation, "
               "and a root kmem_cache_destroy() that waits for neither (seed 000); fixed by "
               "92ee383f6daa (4.18)."),
        Preset("v4.18", "Linux 4.18-5.2 (2018)", HOTPLUG_PERCPU_RWSEM, MEMCG_V4,
               _carried("v4.18"),
               "The merged fix 92ee383f6daa: the root is marked dying and the memcg side "
               "flushed (rcu_barrier, flush_workqueue) before the alias check."),
        Preset("v4.18-refcount", "seed 000's v1/v2 fix (May 2018)", HOTPLUG_PERCPU_RWSEM,
               MEMCG_V4_REFCOUNT, _carried("v4.18-refcount"),
               "Seed 000's alternative: a refcount_t lifetime reference on the root taken by "
               "queued creations and deactivations, and the alias count split out (and "
               "decremented without slab_mutex)."),
        Preset("v5.3", "Linux 5.3-5.7 (2019)", HOTPLUG_PERCPU_RWSEM, MEMCG_V53,
               _carried("v5.3"),
               "percpu_ref-counted child caches (f0a3a24b532d): a reference per charged page "
               "and per allocation in flight, killed at deactivation, released by a work."),
        Preset("v5.9", "Linux 5.9+ (2020)", HOTPLUG_PERCPU_RWSEM, MEMCG_V59, _carried("v5.9"),
               "No per-memcg caches: every object is charged to an obj_cgroup (10befea91b61)."),
        Preset("fixed", "every fix applied", HOTPLUG_PERCPU_RWSEM, MEMCG_V4, _carried("fixed"),
               "The per-memcg-cache design with every catalog fix applied."),
    )
}


class ConfigError(ValueError):
    """An unknown preset or bug name (the stress CLI turns it into a one-line error)."""


@dataclass(frozen=True)
class Config:
    """``Config.make("v3.6", bugs=["alias_race"])``."""

    preset: str = "fixed"
    bugs: frozenset[str] = field(default_factory=frozenset)
    hotplug: str = HOTPLUG_PERCPU_RWSEM
    memcg: str = MEMCG_V4

    @classmethod
    def make(cls, preset: str = "fixed", bugs: list[str] | tuple[str, ...] = (),
             hotplug: str | None = None, memcg: str | None = None) -> Config:
        p = PRESETS.get(preset)
        if p is None:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        if isinstance(bugs, str):  # bugs="alias_race": one name, not its characters
            bugs = (bugs,)
        for b in bugs:
            if b not in BUG_NAMES:
                raise ConfigError(f"unknown bug {b!r} (known bugs: {', '.join(BUG_NAMES)})")
        if hotplug is not None and hotplug not in HOTPLUG_DESIGNS:
            raise ConfigError(f"unknown hotplug design {hotplug!r} (choose from "
                              f"{', '.join(HOTPLUG_DESIGNS)})")
        if memcg is not None and memcg not in MEMCG_DESIGNS:
            raise ConfigError(f"unknown memcg design {memcg!r} (choose from "
                              f"{', '.join(MEMCG_DESIGNS)})")
        all_bugs = p.bugs | frozenset(bugs)
        explicit_hotplug = hotplug
        if hotplug is None:
            # a switched-on bug brings the hotplug design its historical code path needs
            needed = {BY_NAME[b].requires_hotplug for b in bugs} - {None}
            hotplug = needed.pop() if len(needed) == 1 else p.hotplug
        if memcg is None:
            # ... and the memcg design its code lives in, unless the preset's has it too
            memcg = p.memcg
            for b in bugs:
                designs = BY_NAME[b].requires_memcg
                if designs and memcg not in designs:
                    memcg = designs[0]
                    if explicit_hotplug is None:
                        # that design's paths nest get_online_cpus(): the 2012 reader count
                        # allows it, a percpu rwsem with a writer queued would self-deadlock
                        hotplug = MEMCG_HOTPLUG.get(memcg, hotplug)
        elif explicit_hotplug is None:
            hotplug = MEMCG_HOTPLUG.get(memcg, hotplug)  # as above, for a design asked for
        return cls(preset, all_bugs, hotplug, memcg)

    def bug(self, name: str) -> bool:
        """Is the historical code path ``name`` switched on? Called only at the point where
        the fix changed the code."""
        return name in self.bugs
