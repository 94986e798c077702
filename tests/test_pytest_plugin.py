"""kmemcg.pytest_plugin: users' suites (run here with pytester) get kernels whose undeclared
findings fail the test, breakpoints released at teardown, a held-lock dump on timeout, opt-in
soak tests, and a campaign report merged on the xdist controller."""

from __future__ import annotations

import json
import threading

import pytest

from kmemcg import Kernel
from kmemcg.pytest_plugin import BreakpointHelper

pytest_plugins = ["pytester"]
# inner in-process sessions: kmemcg is already imported (no assertion rewriting for it), and
# pytest-benchmark warns under xdist; neither concerns the plugin under test
pytestmark = [pytest.mark.filterwarnings("ignore:Module already imported so cannot be rewritten"),
              pytest.mark.filterwarnings("ignore:Benchmarks are automatically disabled")]

ABBA = """
import pytest

@pytest.mark.kmemcg_expect("circular_locking")
def test_declared(kernel):
    a, b = kernel.mutex("A"), kernel.mutex("B")
    with a, b:
        pass
    with b, a:
        pass

def test_declared_by_fixture(kernel, kernel_expect):
    kernel_expect("circular_locking")
    a, b = kernel.mutex("A"), kernel.mutex("B")
    with a, b:
        pass
    with b, a:
        pass

def test_undeclared(kernel):
    a, b = kernel.mutex("A"), kernel.mutex("B")
    with a, b:
        pass
    with b, a:
        pass

@pytest.mark.kmemcg_expect("kasan_use_after_free")
def test_absent(kernel):
    pass

@pytest.mark.kmemcg_expect("kasan_use_after_free", optional=True)
def test_absent_optional(kernel):
    pass

def test_clean(kernel):
    with kernel.mutex("A"):
        pass
"""


def test_findings_must_be_declared(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ABBA)
    r = pytester.runpytest("--strict-markers", "-p", "no:randomly")
    r.assert_outcomes(passed=6, errors=2)  # the two errors are teardown checks
    out = r.stdout.str()
    # the undeclared finding fails its test with the kernel-format report
    assert "ERROR at teardown of test_undeclared" in out
    assert "undeclared finding [circular_locking]" in out
    assert "WARNING: possible circular locking dependency detected" in out
    assert "kmemcg_expect('circular_locking')" in out
    # a declared finding that never came is a failure too, unless optional
    assert "ERROR at teardown of test_absent _" in out
    assert "expected finding [kasan_use_after_free]" in out and "optional=True" in out
    assert "test_absent_optional" not in out.split("short test summary")[1]


def test_kernel_marker_and_indirect_parametrization(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.kmemcg_kernel(config="v3.6", cpus=2)
        def test_marker(kernel):
            assert kernel.config.preset == "v3.6"
            assert "destroy_rcu_barrier_under_slab_mutex" in kernel.config.bugs
            assert kernel.config.hotplug == "2012"

        @pytest.mark.kmemcg_kernel(bugs=["alias_race"])
        def test_bugs(kernel):
            assert kernel.config.preset == "fixed" and kernel.config.bug("alias_race")

        @pytest.mark.parametrize("kernel", ["v3.16", {"config": "fixed", "lock_stat": True}],
                                 indirect=True)
        def test_indirect(kernel):
            assert kernel.config.preset in ("v3.16", "fixed")
            assert kernel.lock_stat == (kernel.config.preset == "fixed")

        def test_factory(kernel, kmemcg_kernel_factory):
            other = kmemcg_kernel_factory(config="v3.6")
            assert other is not kernel and other.config.preset == "v3.6"

        @pytest.mark.kmemcg_expect("no_such_kind")
        def test_typo(kernel):
            pass
    """)
    r = pytester.runpytest("--strict-markers")
    r.assert_outcomes(passed=5, errors=1)
    assert "unknown finding kind 'no_such_kind'" in r.stdout.str()


def test_stuck_model_thread_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import threading

        def test_stuck(kernel):
            # a model thread that ignores teardown (it sleeps outside k.waits) for 0.5 s
            kernel.kthread_run(threading.Event().wait, 0.5, name="sleeper")
    """)
    try:
        r = pytester.runpytest("--kmemcg-shutdown-timeout", "0.05")
    finally:  # leave no thread behind
        for t in threading.enumerate():
            if t.name == "sleeper":
                t.join(5.0)
    r.assert_outcomes(passed=1, errors=1)
    assert "1 model thread(s) still alive 0.05s after shutdown: sleeper" in r.stdout.str()


def test_breakpoints_released_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_forgets_release(kernel, kernel_breakpoints):
            m = kernel.mutex("parked")
            bp = kernel_breakpoints.add("lock_acquire:parked", max_pause=60.0)

            def taker():
                with m:
                    pass
            kernel.kthread_run(taker, name="taker")
            assert bp.wait(5.0).comm == "taker"
    """)
    r = pytester.runpytest("--kmemcg-shutdown-timeout", "5")
    r.assert_outcomes(passed=1)


def test_breakpoint_helper_release_all() -> None:
    with Kernel(name="bp") as k:
        h = BreakpointHelper(k)
        m = k.mutex("parked")
        bp = h.add("lock_acquire:parked", max_pause=60.0)
        done = threading.Event()

        def taker() -> None:
            with m:
                pass
            done.set()
        k.kthread_run(taker, name="taker")
        bp.wait(5.0)
        assert not done.is_set()
        h.release_all()  # the kernel is alive: only the release lets the taker go
        assert done.wait(5.0) and h.armed == []


def test_timeout_dumps_model_held_locks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        from kmemcg.testing import held_by_another_task

        @pytest.mark.timeout(1.5, method="thread")
        def test_hangs(kernel):
            outer, inner = kernel.mutex("outer_lock"), kernel.mutex("inner_lock")
            with outer, held_by_another_task(kernel, inner, timeout=30.0):
                inner.lock()   # never granted: pytest-timeout fires
    """)
    r = pytester.runpytest_subprocess()
    out = r.stdout.str() + r.stderr.str()
    assert "Timeout" in out
    assert "kmemcg: kernel 'test_hangs' at timeout" in out
    assert "Showing all locks held in the system" in out
    assert "(outer_lock)" in out and "(inner_lock)" in out and "held by holder/" in out
    assert "blocked on inner_lock" in out


def test_soak_is_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.soak
        def test_long():
            pass

        @pytest.mark.slow
        def test_slow():
            pass
    """)
    r = pytester.runpytest("--strict-markers")
    r.assert_outcomes(passed=1, deselected=1)
    r = pytester.runpytest("--strict-markers", "-m", "soak")
    r.assert_outcomes(passed=1, deselected=1)


CAMPAIGN = """
import pytest

@pytest.mark.parametrize("order", [("A", "B"), ("B", "A")])
def test_half(order, kmemcg_campaign):
    from kmemcg import Kernel
    with Kernel(name="half") as k:
        first, second = (k.mutex(n) for n in order)
        with first, second:
            pass
        graph = k.lockdep_graph()
    meta = {"kernel": "fixed", "bugs": [], "seed": 1, "workload": "w", "duration_s": 1.0,
            "ops_per_s": 1.0, "exit_code": 0}
    kmemcg_campaign.record("fixed/" + "".join(order), meta, [], graph)
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["local", "xdist"])
def test_campaign_merges_runs_into_cross_run_cycles(pytester: pytest.Pytester,
                                                    xdist: bool) -> None:
    """A -> B recorded by one test, B -> A by another: only the merged graph has the cycle;
    a fixed kernel must not have one, so the session fails and the report says why."""
    pytester.makepyfile(CAMPAIGN)
    out = pytester.path / "campaign"
    args = ["--campaign-report", str(out), "-p", "no:randomly"]
    r = pytester.runpytest(*args, *(["-n", "2"] if xdist else ["-p", "no:xdist"]))
    r.assert_outcomes(passed=2)
    assert r.ret == pytest.ExitCode.TESTS_FAILED  # the campaign's verdict
    assert "kmemcg campaign" in r.stdout.str() and "FAIL" in r.stdout.str()
    rep = json.loads((out / "campaign.json").read_text())
    assert rep["format"] == "kmemcg-campaign"
    if xdist:
        assert rep["workers"] and set(rep["workers"]) <= {"gw0", "gw1"}
    else:
        assert rep["workers"] == ["local"]
    (cross,) = rep["kernels"]["fixed"]["graph"]["cross_run_cycles"]
    assert cross["classes"] == ["A", "B"]
    assert sorted(e["run"] for e in cross["edges"]) == ["fixed/AB", "fixed/BA"]
    assert all(e["stack"] for e in cross["edges"])  # both sides' stacks
    assert any("cycle only the merged graph has: A -> B -> A" in v for v in rep["violations"])
    txt = (out / "campaign.txt").read_text()
    assert "cross-run cycle #1: A -> B -> A" in txt and "VIOLATIONS" in txt
    assert (out / "fixed" / "lockdep_graph.json").exists()
