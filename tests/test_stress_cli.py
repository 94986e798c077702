"""``python -m stress``: usage errors, the JSON summary, exit codes and the report directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stress.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stress", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--duration", "-1"], "--duration must be a positive number of seconds, got -1.0"),
    (["--workload", "nope"], "unknown --workload 'nope'"),
    (["--threads", "many"], "argument --threads: invalid int value: 'many'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_usage_is_one_line_and_exit_2(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stress: error: ")
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_clean_workload_with_64_threads_has_no_finding(capsys):
    code = main(["--threads", "64", "--duration", "2", "--json", "--quiet", "--seed", "7"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["exit_code"] == 0
    assert out["findings"] == []
    assert out["seed"] == 7 and out["threads"] == 64
    assert out["ops"]["lock"] > 1000
    for key in ("kernel", "bugs", "duration_s", "ops", "findings"):
        assert key in out


def test_lockdep_demo_reports_the_2012_inversion_and_writes_the_report(tmp_path, capsys):
    rep = tmp_path / "rep"
    code = main(["--threads", "8", "--duration", "1.5", "--workload", "lockdep-demo",
                 "--json", "--quiet", "--report", str(rep)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["exit_code"] == 1
    cycles = [f for f in out["findings"] if f["kind"] == "circular_locking"]
    assert [f["signature"] for f in cycles] == ["cpu_hotplug.lock+slab_mutex"]
    assert cycles[0]["count"] >= 1 and cycles[0]["first_seen_s"] >= 0
    assert "*** DEADLOCK ***" in cycles[0]["text"]
    assert not [f for f in out["findings"] if f["kind"] == "real_deadlock"]
    names = set(os.listdir(rep))
    assert {"summary.json", "findings.txt", "lock_stat.txt", "lockdep.txt",
            "lockdep_graph.json", "lockdep_graph.dot"} <= names
    graph = json.loads((rep / "lockdep_graph.json").read_text())
    edges = {(e["from"], e["to"]) for e in graph["edges"]}
    assert ("slab_mutex", "cpu_hotplug.lock") in edges
    assert ("cpu_hotplug.lock", "slab_mutex") in edges
    assert "possible circular locking dependency" in (rep / "findings.txt").read_text()


def test_interrupt_writes_a_partial_report_and_exits_130(tmp_path):
    rep = tmp_path / "rep"
    p = subprocess.Popen([sys.executable, "-m", "stress", "--threads", "4", "--duration", "60",
                          "--quiet", "--report", str(rep)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # wait for the run to start (the seed line), then interrupt it
        line = p.stderr.readline()
        assert "seed" in line
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["exit_code"] == 130
    assert summary["ops"].get("lock", 0) > 0
