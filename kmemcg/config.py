"""Kernel configuration: which design the model runs (a *preset*, named after the release whose
behaviour it models) and which historical bugs are switched back on.

A bug switch restores the historical code path at the exact point where the fix changed it
(the code tests ``k.config.bug("name")`` there and nowhere else). Switches combine with any
preset; a bug whose historical path needs its era's CPU-hotplug design (catalog
``requires_hotplug``) brings that design along unless ``hotplug=`` is given. The
checkers never read the configuration: they find bugs from behaviour alone.

Presets and the catalog bugs each carries (fixing commits in :mod:`kmemcg.catalog`):

========  =============================================================================
preset    design and bugs
========  =============================================================================
v3.6      2012 CPU-hotplug refcount lock; rcu_barrier() takes get_online_cpus() (commit
          1331e7a1bbe1); kmem_cache_destroy holds slab_mutex across rcu_barrier():
          bug ``destroy_rcu_barrier_under_slab_mutex`` (seed 004)
v3.16     slab side of 3.16-3.18: destroy drops slab_mutex with the alias count at zero
          to destroy memcg children: bug ``alias_race`` (Dec 2014)
v4.17     asynchronous memcg cache creation and deactivation, and a root destroy that waits
          for neither: bug ``root_destroy_without_flush`` (seed 000; fixed by 92ee383f6daa)
fixed     every fix applied (default)
========  =============================================================================

The other memcg eras (v3.13, v4.18, v5.3, v5.9) are still to come (docs/memcg-eras.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmemcg.catalog import BY_NAME, CATALOG

HOTPLUG_2012 = "2012"
HOTPLUG_PERCPU_RWSEM = "percpu_rwsem"
HOTPLUG_DESIGNS = (HOTPLUG_2012, HOTPLUG_PERCPU_RWSEM)


@dataclass(frozen=True)
class Preset:
    name: str
    release: str  # what it models
    hotplug: str
    bugs: frozenset[str]
    doc: str


# Every switchable bug, by name: the catalog is the one list (and says which presets carry
# each bug, so a preset's bug set below is derived from it).
BUG_NAMES = tuple(BY_NAME)


def _carried(preset: str) -> frozenset[str]:
    return frozenset(b.name for b in CATALOG if preset in b.presets)


PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("v3.6", "Linux 3.6 (2012)", HOTPLUG_2012, _carried("v3.6"),
               "kmem_cache_destroy() holds slab_mutex across rcu_barrier(), which takes "
               "get_online_cpus() since 1331e7a1bbe1; fixed by 210ed9defffc (3.7)."),
        Preset("v3.16", "Linux 3.16-3.18 (2014)", HOTPLUG_2012, _carried("v3.16"),
               "kmem_cache_destroy() drops slab_mutex after the alias count reached zero, "
               "and find_mergeable() still offers the doomed cache to kmem_cache_create()."),
        Preset("v4.17", "Linux 4.11-4.17 (2018)", HOTPLUG_PERCPU_RWSEM, _carried("v4.17"),
               "Asynchronous memcg cache deactivation (call_rcu, then a work) and creation, "
               "and a root kmem_cache_destroy() that waits for neither (seed 000); fixed by "
               "92ee383f6daa (4.18)."),
        Preset("fixed", "every fix applied", HOTPLUG_PERCPU_RWSEM, _carried("fixed"),
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

    @classmethod
    def make(cls, preset: str = "fixed", bugs: list[str] | tuple[str, ...] = (),
             hotplug: str | None = None) -> Config:
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
        all_bugs = p.bugs | frozenset(bugs)
        if hotplug is None:
            # a switched-on bug brings the hotplug design its historical code path needs
            needed = {BY_NAME[b].requires_hotplug for b in bugs} - {None}
            hotplug = needed.pop() if len(needed) == 1 else p.hotplug
        return cls(preset, all_bugs, hotplug)

    def bug(self, name: str) -> bool:
        """Is the historical code path ``name`` switched on? Called only at the point where
        the fix changed the code."""
        return name in self.bugs
