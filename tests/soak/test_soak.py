"""Soak campaigns: ``python -m stress`` over (preset x seed x workload), spread over xdist
workers; the controller merges every run into one report (``--campaign-report DIR``).

``pytest -m soak -n auto --soak-duration 30 --soak-seeds 4 --campaign-report campaign``.
The default run keeps two short campaign runs (fixed and v3.6, 2 s each) so the mechanism
(stress run, verdict, worker -> controller hand-over, merge) is exercised on every ``pytest``.
"""

from __future__ import annotations

import pytest

from kmemcg.config import PRESETS

SOAK_WORKLOADS = ("default", "churn")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "soak_case" in metafunc.fixturenames:
        seeds = metafunc.config.getoption("soak_seeds")
        cases = [(p, s, w) for p in PRESETS for s in range(1, seeds + 1)
                 for w in SOAK_WORKLOADS]
        metafunc.parametrize("soak_case", cases,
                             ids=[f"{p}-seed{s}-{w}" for p, s, w in cases])


def _check(run) -> None:
    problems = run.problems()
    assert not problems, f"{run.label}:\n" + "\n".join(problems) + f"\n{run.stderr}"


@pytest.mark.soak
def test_soak(soak_case, kmemcg_campaign) -> None:
    """Fixed presets come out clean; presets with known bugs show exactly those (the kinds
    kmemcg.catalog lists as their detectors), and at least one of them."""
    preset, seed, workload = soak_case
    _check(kmemcg_campaign.run(preset=preset, seed=seed, workload=workload))


@pytest.mark.parametrize("preset", ["fixed", "v3.6"])
def test_short_campaign(preset, kmemcg_campaign) -> None:
    """The default run's share of soaking: a few seconds per worker."""
    run = kmemcg_campaign.run(preset=preset, seed=1, workload="default", duration=2.0,
                              threads=16)
    _check(run)
    assert run.meta["kernel"] == preset
    assert run.graph["edges"], "a stress run with lockdep on records dependencies"
    if preset == "v3.6":
        assert run.kinds == {"circular_locking"}
