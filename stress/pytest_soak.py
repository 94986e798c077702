"""pytest plugin (entry point ``pytest11: kmemcg-soak``): soak campaigns under pytest-xdist.

``pytest -m soak -n auto --soak-duration S --soak-seeds N --campaign-report DIR`` runs
``python -m stress`` across (preset x seed x workload). Every ``kmemcg_campaign.run()`` is
recorded; an xdist worker ships its runs to the controller in ``config.workeroutput``
(collected in ``pytest_testnodedown``), and the controller writes the campaign report in
``pytest_sessionfinish`` (:mod:`stress.campaign`: verdicts, merged findings and lockdep graphs,
cycles that only the merged graph has).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from stress.campaign import build, headline, verdict, write

WORKER_KEY = "kmemcg_campaign"  # config.workeroutput key an xdist worker ships its runs under
_RUNS = pytest.StashKey[list]()
_REPORT = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kmemcg-soak", "kmemcg soak campaigns")
    g.addoption("--soak-duration", type=float, default=10.0, metavar="S",
                help="seconds of each soak stress run (default 10)")
    g.addoption("--soak-seeds", type=int, default=2, metavar="N",
                help="seeds per preset and workload in a soak campaign (default 2)")
    g.addoption("--soak-threads", type=int, default=64, metavar="N",
                help="driver threads of each soak stress run (default 64)")
    g.addoption("--soak-perturb", default="heavy", choices=("off", "light", "heavy"),
                help="race-window perturbation of soak runs (default heavy: race bugs "
                     "show within seconds)")
    g.addoption("--campaign-report", default=None, metavar="DIR",
                help="write the merged campaign report (JSON + text + merged lockdep "
                     "graph) into DIR")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUNS] = []


class StressRun:
    """One recorded ``python -m stress`` run: ``label``, ``meta``, ``findings``, ``graph``."""

    def __init__(self, record: dict[str, Any], stderr: str = "") -> None:
        self.record = record
        self.label: str = record["label"]
        self.meta: dict[str, Any] = record["meta"]
        self.findings: list[dict[str, Any]] = record["findings"]
        self.graph: dict[str, Any] = record["graph"]
        self.stderr = stderr

    @property
    def kinds(self) -> set[str]:
        return {f["kind"] for f in self.findings}

    def problems(self) -> list[str]:
        """What breaks "fixed comes out clean, a buggy preset shows exactly its bugs"."""
        return verdict(self.meta, self.findings)


class Campaign:
    """The ``kmemcg_campaign`` fixture: ``run(preset=, seed=, workload=, ...)`` hammers a
    kernel in a ``python -m stress`` subprocess and records the outcome for the campaign
    report; ``record(label, meta, findings, graph)`` records a run made otherwise."""

    def __init__(self, config: pytest.Config, item: pytest.Item, tmpdir: str) -> None:
        self.config, self.item, self.tmpdir = config, item, tmpdir

    def run(self, *, preset: str = "fixed", seed: int = 1, workload: str = "default",
            bugs: tuple[str, ...] = (), duration: float | None = None,
            threads: int | None = None, perturb: str | None = None,
            extra: tuple[str, ...] = ()) -> StressRun:
        opt = self.config.getoption
        duration = opt("soak_duration") if duration is None else duration
        threads = opt("soak_threads") if threads is None else threads
        perturb = opt("soak_perturb") if perturb is None else perturb
        label = f"{preset}{''.join('+' + b for b in bugs)}/seed{seed}/{workload}"
        rdir = os.path.join(self.tmpdir, re.sub(r"[^\w.+-]", "_", label))
        argv = [sys.executable, "-m", "stress", "--kernel", preset, "--seed", str(seed),
                "--workload", workload, "--duration", str(duration), "--threads", str(threads),
                "--perturb", perturb, "--json", "--quiet", "--report", rdir, *extra]
        for b in bugs:
            argv += ["--bug", b]
        # bounded: stress stops itself at --duration; the margin covers boot and teardown
        # the stress package sits beside kmemcg (a checkout, or an xdist --rsyncdir copy on a
        # remote host): the subprocess imports the same code as this worker
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, env=env)
        if p.returncode in (2, 4) or not os.path.exists(os.path.join(rdir, "summary.json")):
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr}")
        with open(os.path.join(rdir, "summary.json")) as fh:
            s = json.load(fh)
        with open(os.path.join(rdir, "lockdep_graph.json")) as fh:
            graph = json.load(fh)
        meta = {k: s[k] for k in ("kernel", "bugs", "seed", "workload", "threads",
                                  "duration_s", "ops_per_s", "exit_code") if k in s}
        meta["extra_bugs"] = list(bugs)
        return self.record(label, meta, s["findings"], graph, stderr=p.stderr)

    def record(self, label: str, meta: dict[str, Any], findings: list[dict[str, Any]],
               graph: dict[str, Any], stderr: str = "") -> StressRun:
        wid = getattr(self.config, "workerinput", {}).get("workerid", "local")
        rec = json.loads(json.dumps({  # plain JSON: execnet ships it to the controller
            "label": label, "nodeid": self.item.nodeid, "worker": wid, "meta": meta,
            "findings": findings, "graph": graph}))
        self.config.stash[_RUNS].append(rec)
        out = getattr(self.config, "workeroutput", None)
        if out is not None:
            out.setdefault(WORKER_KEY, []).append(rec)
        return StressRun(rec, stderr)


@pytest.fixture
def kmemcg_campaign(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    return Campaign(request.config, request.node, str(tmp_path_factory.mktemp("stress")))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: a worker finished; take the runs it recorded."""
    runs = getattr(node, "workeroutput", {}).get(WORKER_KEY, [])
    node.config.stash[_RUNS].extend(runs)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # a worker: its runs travel in workeroutput
        return
    runs = config.stash.get(_RUNS, [])
    if not runs:
        return
    report = build(runs)
    config.stash[_REPORT] = report
    path = config.getoption("campaign_report")
    if path:
        write(path, report)
    if report["violations"] and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    terminalreporter.section("kmemcg campaign")
    terminalreporter.write(headline(report, config.getoption("campaign_report")))
