"""CONFIG_FAILSLAB in the model (``kmemcg.core.failslab``): off by default, a seeded
per-task choice, and an event at the instrumentation point for every injected failure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kmemcg import Kernel
from kmemcg.core.failslab import FailSlab

from .test_instrument import Recorder


def test_off_by_default_never_fails():
    with Kernel() as k:
        assert k.failslab.probability == 0
        assert not any(k.should_failslab("site") for _ in range(1000))
        assert not k.failslab.injected


def test_probability_one_always_fails_and_counts_per_site():
    with Kernel() as k:
        k.failslab = FailSlab(seed=1, probability=1.0)
        rec = Recorder()
        k.add_instrument(rec)
        assert all(k.should_failslab("a") for _ in range(3)) and k.should_failslab("b")
        assert k.failslab.injected == {"a": 3, "b": 1}
        assert [lbl for p, lbl, _t, _o in rec.events if p == "failslab"] == ["a"] * 3 + ["b"]


def test_a_seed_fixes_each_tasks_choices():
    """Per (seed, pid): a kernel's tasks get their pids in the order they first run, which
    threads decide, so the task here is a stand-in with a fixed pid."""
    def draws(seed: int, pid: int = 3) -> list[bool]:
        fs = FailSlab(seed=seed, probability=0.3)
        task = SimpleNamespace(pid=pid, extra={})
        return [fs.should_fail(task, "s") for _ in range(200)]

    a = draws(5)
    assert a == draws(5) and a != draws(6) and a != draws(5, pid=4)
    assert 30 < sum(a) < 90  # about 60 of 200


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_a_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="not in"):
        FailSlab(probability=p)
