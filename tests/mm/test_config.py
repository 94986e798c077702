"""Configuration presets, bug switches and the bug catalog (kmemcg.config, kmemcg.catalog):
validation with clear errors, presets derived from the catalog, complete catalog entries whose
detectors are real finding kinds, windows and switches that exist in the code."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

import kmemcg
from kmemcg import Kernel
from kmemcg.catalog import BY_NAME, CATALOG, Bug, listing
from kmemcg.config import (
    BUG_NAMES,
    HOTPLUG_2012,
    HOTPLUG_DESIGNS,
    HOTPLUG_PERCPU_RWSEM,
    PRESETS,
    Config,
    ConfigError,
)
from kmemcg.core import findings as F

SOURCES = {p: p.read_text() for p in pathlib.Path(kmemcg.__file__).parent.rglob("*.py")}
FINDING_KINDS = {v for k, v in vars(F).items() if k.isupper() and isinstance(v, str)}


# ----------------------------------------------------------------------------- validation

def test_unknown_preset_is_a_config_error_naming_it_and_the_choices() -> None:
    with pytest.raises(ConfigError) as ei:
        Config.make("v2.4")
    msg = str(ei.value)
    assert "'v2.4'" in msg
    assert all(p in msg for p in PRESETS)
    with pytest.raises(ConfigError, match="unknown preset 'bogus'"):
        Kernel(config="bogus")


def test_unknown_bug_is_a_config_error_naming_it_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as ei:
        Config.make("fixed", bugs=["alias_race", "no_such_bug"])
    msg = str(ei.value)
    assert "'no_such_bug'" in msg
    assert all(b in msg for b in BUG_NAMES)
    with pytest.raises(ConfigError, match="unknown bug 'nope'"):
        Kernel(bugs=["nope"])
    with pytest.raises(ConfigError, match="unknown bug 'nope'"):
        Kernel(config=Config.make("v3.6"), bugs=["nope"])


def test_config_error_is_a_value_error_and_leaves_no_kernel_behind() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        Kernel(config="v9.9")


def test_one_bug_name_given_as_a_string_is_one_switch() -> None:
    c = Config.make("fixed", bugs="alias_race")
    assert c.bugs == frozenset({"alias_race"})


def test_unknown_hotplug_design_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown hotplug design 'big_kernel_lock'"):
        Config.make("fixed", hotplug="big_kernel_lock")
    assert set(HOTPLUG_DESIGNS) == {HOTPLUG_2012, HOTPLUG_PERCPU_RWSEM}


# ----------------------------------------------------------------------------- presets

def test_default_is_fixed_with_no_bug() -> None:
    c = Config.make()
    assert c.preset == "fixed" and c.bugs == frozenset()
    assert c.hotplug == HOTPLUG_PERCPU_RWSEM
    assert not any(c.bug(b) for b in BUG_NAMES)
    with Kernel() as k:
        assert k.config == c


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_carries_exactly_the_catalog_bugs_that_name_it(preset: str) -> None:
    expected = {b.name for b in CATALOG if preset in b.presets}
    assert PRESETS[preset].bugs == expected
    c = Config.make(preset)
    assert c.bugs == expected
    assert {b for b in BUG_NAMES if c.bug(b)} == expected
    assert c.hotplug == PRESETS[preset].hotplug


def test_preset_table_matches_the_catalog_by_hand() -> None:
    """The same mapping written out, so a catalog edit that moves a bug is noticed."""
    assert PRESETS["v3.6"].bugs == {"destroy_rcu_barrier_under_slab_mutex"}
    assert PRESETS["v3.13"].bugs == {
        "memcg_create_without_slab_mutex_recheck", "destroy_work_scheduled_twice",
        "get_cache_without_reference", "free_path_touches_cache_after_uncharge",
        "memcg_params_freed_without_rcu", "cancel_work_sync_self_freeing_work",
        "children_destroyed_before_alias_check"}
    assert PRESETS["v3.16"].bugs == {"alias_race", "get_cache_without_reference",
                                     "free_path_touches_cache_after_uncharge"}
    assert PRESETS["v4.17"].bugs == {"root_destroy_without_flush"}
    assert PRESETS["v4.18"].bugs == {"dying_set_before_alias_check"}
    assert PRESETS["v4.18-refcount"].bugs == {"alias_count_dec_without_slab_mutex"}
    assert PRESETS["v5.3"].bugs == {"percpu_ref_exit_while_switching",
                                    "dying_set_before_alias_check"}
    assert PRESETS["v5.9"].bugs == frozenset()
    assert PRESETS["fixed"].bugs == frozenset()
    assert PRESETS["v3.6"].hotplug == HOTPLUG_2012
    assert PRESETS["fixed"].hotplug == HOTPLUG_PERCPU_RWSEM
    assert {n: p.memcg for n, p in PRESETS.items()} == {
        "v3.6": "v4", "v3.13": "v3.13", "v3.16": "v3.16", "v4.17": "v4", "v4.18": "v4",
        "v4.18-refcount": "v4-refcount", "v5.3": "v5.3", "v5.9": "v5.9", "fixed": "v4"}


def test_every_preset_named_in_the_catalog_exists() -> None:
    named = {p for b in CATALOG for p in b.presets}
    assert named <= set(PRESETS)


def test_switches_combine_with_any_preset() -> None:
    c = Config.make("v3.6", bugs=["put_online_cpus_imbalance"])
    assert c.bugs == {"destroy_rcu_barrier_under_slab_mutex", "put_online_cpus_imbalance"}
    assert c.hotplug == HOTPLUG_2012
    c2 = Config.make("fixed", bugs=["alias_race"], hotplug=HOTPLUG_2012)
    assert c2.bugs == {"alias_race"} and c2.hotplug == HOTPLUG_2012
    with Kernel(config="v3.16", bugs=["destroy_without_rcu_barrier"]) as k:
        assert k.config.bugs == PRESETS["v3.16"].bugs | {"destroy_without_rcu_barrier"}
        assert k.config.memcg == "v3.16"
        assert k.hotplug.design == HOTPLUG_2012
    # a Config object plus more switches and another hotplug design
    with Kernel(config=c2, bugs=["destroy_without_rcu_barrier"],
                hotplug=HOTPLUG_PERCPU_RWSEM) as k:
        assert k.config.bugs == {"alias_race", "destroy_without_rcu_barrier"}
        assert k.config.preset == "fixed"
        assert k.hotplug.design == HOTPLUG_PERCPU_RWSEM


def test_kernel_uses_the_presets_hotplug_and_memcg_designs() -> None:
    from kmemcg.mm.memcg_designs import DESIGNS
    for preset, p in PRESETS.items():
        with Kernel(config=preset) as k:
            assert k.hotplug.design == p.hotplug, preset
            assert k.config.bugs == p.bugs
            assert k.config.memcg == p.memcg
            assert type(k.memcg_slab).__name__ == DESIGNS[p.memcg][1], preset


def test_config_is_immutable() -> None:
    c = Config.make("v3.6")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.preset = "fixed"  # type: ignore[misc]


# ----------------------------------------------------------------------------- catalog

def test_catalog_ids_and_names_are_unique_and_indexed() -> None:
    ids = [b.id for b in CATALOG]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(BY_NAME) == len(CATALOG)
    assert all(BY_NAME[b.name] is b for b in CATALOG)
    assert BUG_NAMES == tuple(b.name for b in CATALOG)


@pytest.mark.parametrize("bug", CATALOG, ids=lambda b: b.name)
def test_catalog_entry_is_complete(bug: Bug) -> None:
    for f in ("name", "era", "source", "description", "interleaving"):
        v = getattr(bug, f)
        assert isinstance(v, str) and v.strip(), f"{bug.name}: empty {f}"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", bug.name), bug.name
    assert isinstance(bug.presets, tuple)
    assert bug.detector, f"{bug.name}: no detector"
    for kind in bug.detector:
        assert kind in FINDING_KINDS, f"{bug.name}: {kind!r} is not a finding kind"
    assert len(set(bug.detector)) == len(bug.detector)
    assert bug.window is None or (isinstance(bug.window, str) and ":" in bug.window)


@pytest.mark.parametrize("bug", CATALOG, ids=lambda b: b.name)
def test_catalog_switch_and_window_exist_in_the_code(bug: Bug) -> None:
    """The switch is tested somewhere (``bug("name")``) and the named race window is a real
    ``k.window("...")`` point, so a breakpoint on it can be hit."""
    switch = re.compile(r'bug\(\s*"' + re.escape(bug.name) + r'"\s*\)')
    assert any(switch.search(src) for p, src in SOURCES.items()
               if p.name not in ("catalog.py", "config.py")), bug.name
    if bug.window is not None:
        assert any(f'window("{bug.window}")' in src for src in SOURCES.values()), bug.window


def test_listing_names_every_bug_and_detector() -> None:
    text = listing()
    assert len(text.splitlines()) == len(CATALOG)
    for b in CATALOG:
        assert b.name in text
        assert all(d in text for d in b.detector)


def test_a_switch_brings_the_hotplug_design_its_historical_path_needs():
    """Bug 1 is only an inversion when rcu_barrier() takes the 2012 hotplug lock: switched on
    over the fixed preset it brings that design along, unless one is asked for."""
    assert Config.make("fixed", ["destroy_rcu_barrier_under_slab_mutex"]).hotplug == "2012"
    assert Config.make("fixed", ["destroy_rcu_barrier_under_slab_mutex"],
                       "percpu_rwsem").hotplug == "percpu_rwsem"
    assert Config.make("fixed", ["alias_race"]).hotplug == "percpu_rwsem"


def test_a_switch_brings_the_memcg_design_its_code_lives_in():
    """Bug 6 exists only in the 3.13 design (per-memcg slab_caches_mutex): switched on over
    the fixed preset it brings that design; a bug any of several designs carry keeps the
    preset's design when it is one of them; an explicit design wins."""
    assert Config.make("fixed", ["shrink_under_slab_caches_mutex"]).memcg == "v3.13"
    # and the 3.13 design nests get_online_cpus(): it brings the 2012 hotplug lock
    assert Config.make("fixed", ["shrink_under_slab_caches_mutex"]).hotplug == "2012"
    assert Config.make("fixed", ["shrink_under_slab_caches_mutex"],
                       hotplug="percpu_rwsem").hotplug == "percpu_rwsem"
    assert Config.make("fixed", ["get_cache_without_reference"]).memcg == "v4"
    assert Config.make("v3.16", ["get_cache_without_reference"]).memcg == "v3.16"
    assert Config.make("fixed", ["percpu_ref_exit_while_switching"]).memcg == "v5.3"
    assert Config.make("fixed", [], memcg="v5.9").memcg == "v5.9"
    with pytest.raises(ConfigError, match="unknown memcg design 'v2'"):
        Config.make("fixed", memcg="v2")
    for b in CATALOG:
        c = Config.make("fixed", [b.name])
        assert not b.requires_memcg or c.memcg in b.requires_memcg, b.name


def test_a_memcg_design_asked_for_brings_the_hotplug_design_its_paths_need() -> None:
    """The 3.13 / 3.16 destroy paths nest get_online_cpus(): asked for by name (stress
    --memcg), they get the 2012 hotplug lock unless a hotplug design is named too."""
    c = Config.make("fixed", memcg="v3.13")
    assert (c.memcg, c.hotplug, c.bugs) == ("v3.13", "2012", frozenset())
    assert Config.make("fixed", memcg="v3.13", hotplug="percpu_rwsem").hotplug == "percpu_rwsem"
    assert Config.make("fixed", memcg="v5.3").hotplug == Config.make("fixed").hotplug
