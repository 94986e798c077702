"""rcutorture: passes on the real RCU, fails on the busted flavor; rcutorture-shaped output."""

from __future__ import annotations

import pytest

from kmemcg import Kernel
from kmemcg.rcu.torture import PIPE_LEN, main, rcu_torture


def check_shape(text: str, verdict: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith("rcu-torture:--- Start of test: ")
    for head in ("Reader Pipe:", "Reader Batch:", "Free-Block Circulation:"):
        rows = [ln for ln in lines if head in ln]
        assert rows, head
        assert len(rows[-1].split(head)[1].split()) == PIPE_LEN + 1
    assert any(" rtc: " in ln and " ver: " in ln and " rtmbe: " in ln for ln in lines)
    assert lines[-1].startswith(f"rcu-torture:--- End of test: {verdict}")


def test_torture_passes_on_real_rcu() -> None:
    with Kernel(name="rcutorture") as k:
        res = rcu_torture(k, duration=1.0, stat_interval=0.4, seed=1)
    assert res.success, res.text
    check_shape(res.text, "SUCCESS")
    assert res.pipe[0] > 0 and not any(res.pipe[2:])
    assert res.mberrors == 0 and res.barrier_errors == 0
    assert res.versions > PIPE_LEN and res.grace_periods > 0
    # elements went all the way round: some reached PIPE_LEN and were freed
    assert res.circulation[PIPE_LEN - 1] > 0
    assert k.findings.snapshot() == []


def test_torture_catches_the_busted_flavor() -> None:
    with Kernel(name="rcutorture-busted", rcu_flavor="busted") as k:
        res = rcu_torture(k, duration=0.8, stat_interval=0.4, seed=2)
    assert not res.success
    check_shape(res.text, "FAILURE")
    assert any(res.pipe[2:]), res.text
    assert "!!! Reader Pipe:" in res.text
    assert "replay: python -m kmemcg.rcu.torture --flavor busted --seed 2" in res.text


@pytest.mark.parametrize("flavor,code", [("rcu", 0)])
def test_command_line(capsys: pytest.CaptureFixture[str], flavor: str, code: int) -> None:
    assert main(["--flavor", flavor, "--duration", "0.4", "--stat-interval", "0.2",
                 "--seed", "3"]) == code
    out = capsys.readouterr().out
    assert "rcu-torture:--- End of test: SUCCESS: torture_type=rcu" in out
