"""``python -m stress report``: show, graph, diff, merge and lockstat on real runs' report
directories (two ~1 s stress runs, v3.6 and fixed) and on reports built by hand from a Kernel
for the exact cases (an ABBA split over two runs); every error is one line and exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from kmemcg import Kernel
from stress import reporting
from stress.cli import main
from stress.report import graphs as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stress", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=env)


def report(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m stress report ARGS`` in-process: (exit code, stdout, stderr)."""
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stress report: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def reaches(graph: dict, src: str, dst: str) -> bool:
    """Is there a dependency path src -> ... -> dst?"""
    after: dict[str, set[str]] = {}
    for e in graph["edges"]:
        after.setdefault(e["from"], set()).add(e["to"])
    seen, todo = {src}, [src]
    while todo:
        for n in after.get(todo.pop(), ()):
            if n == dst:
                return True
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Two real runs, about 1 s each: the 2012 kernel (with lock_stat) and the fixed one."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("v3.6", ["--lock-stat"]), ("fixed", [])):
        d = str(base / name)
        r = run_cli("--threads", "8", "--duration", "1", "--kernel", name, "--seed", "1",
                    "--quiet", "--json", "--report", d, *extra)
        assert r.returncode == (1 if name == "v3.6" else 0), r.stderr
        out[name] = d
    return out


def take_nested(outer, inner) -> None:
    with outer:
        with inner:  # the call site lockdep records for outer -> inner
            pass


def hand_report(d: str, *orders: tuple[str, str], lock_stat: bool = False) -> str:
    """A report directory from a kernel that took each (outer, inner) pair in that order."""
    with Kernel(name=os.path.basename(d), lock_stat=lock_stat) as k:
        locks: dict[str, object] = {}
        for outer, inner in orders:
            for n in (outer, inner):
                if n not in locks:
                    locks[n] = k.mutex(n)
            take_nested(locks[outer], locks[inner])
        s = reporting.summary(k, seed=0, kernel="fixed", bugs=[], threads=1, duration_s=0.01,
                              ops=Counter(), exit_code=0, workload="hand")
        reporting.write_report_dir(d, k, s)
    return d


# ------------------------------------------------------------------ the report directory
def test_report_dir_has_versioned_lock_stat_json(runs):
    for name, on in (("v3.6", True), ("fixed", False)):
        with open(os.path.join(runs[name], "lock_stat.json")) as fh:
            ls = json.load(fh)
        assert ls["format"] == "kmemcg-lock-stat" and ls["version"] == 1
        assert ls["lock_stat"] is on
        by = {c["class"]: c for c in ls["classes"]}
        assert "slab_mutex" in by
        assert (by["slab_mutex"]["acquisitions"] > 0) is on
        for key in ("contentions", "waittime_total_us", "holdtime_max_us", "contention_points"):
            assert key in by["slab_mutex"]
    # the files that existed before are all still written
    assert {"summary.json", "findings.txt", "lock_stat.txt", "lockdep.txt",
            "lockdep_graph.json", "lockdep_graph.dot"} <= set(os.listdir(runs["fixed"]))


# ---------------------------------------------------------------------------------- show
def test_show_groups_findings_by_kind_and_signature_in_kernel_format(runs, capsys):
    code, out, err = report(capsys, "show", runs["v3.6"])
    assert code == 0 and err == ""
    assert "(kernel v3.6, seed 1): 1 finding" in out.splitlines()[0]
    assert re.search(r"=== circular_locking: 1 signature, \d+ occurrences? ===", out)
    assert re.search(r"--- cpu_hotplug\.lock\+rcu_barrier_mutex\+slab_mutex: seen \d+ times?, "
                     r"first at \d+\.\d{3}s in \S+", out)
    assert "WARNING: possible circular locking dependency detected" in out
    assert "*** DEADLOCK ***" in out and "Chain exists of:" in out
    # the summary.json, or any file of the directory, names the same run
    again = report(capsys, "show", os.path.join(runs["v3.6"], "summary.json"))[1]
    assert again.split("\n", 1)[1] == out.split("\n", 1)[1]
    code, out, _ = report(capsys, "show", runs["fixed"])
    assert code == 0 and "0 findings" in out and "===" not in out


def test_show_filters_by_kind_and_by_class_on_a_real_cycle(runs, capsys):
    def shown(*args: str) -> int:
        code, out, _ = report(capsys, "show", runs["v3.6"], "--brief", *args)
        assert code == 0
        return len([ln for ln in out.splitlines() if ln.startswith("  x")])

    assert shown() == 1
    assert shown("--kind", "circular_locking") == 1
    assert shown("--kind", "hung_task") == 0
    assert shown("--kind", "hung_task", "--kind", "circular_locking") == 1
    for cls in ("slab_mutex", "cpu_hotplug.lock", "rcu_barrier_mutex"):  # on the cycle
        assert shown("--class", cls) == 1, cls
    assert shown("--class", "cpu_add_remove_lock") == 0  # in the graph, not on the cycle
    assert shown("--class", "slab_mutex", "--kind", "hung_task") == 0


def test_class_filter_uses_the_cycle_for_circular_findings_else_extra_and_text(tmp_path,
                                                                               capsys):
    def finding(kind, sig, text, extra=None):
        f = {"kind": kind, "title": f"T {sig}", "signature": sig, "count": 2,
             "thread": "t/1", "first_seen_s": 0.5, "text": text}
        return {**f, "extra": extra} if extra else f

    summary = {"format": "kmemcg-stress-report", "version": 1, "findings": [
        finding("circular_locking", "A+B", "held: (C) while (A) -> (B)", {"classes": ["A", "B/1"]}),
        finding("hung_task", "h1", "task blocked on memcg_slab_mutex", {"blocked_on": "D"}),
        finding("assertion", "x1", "WARNING at slab_mutex.\n"),
    ]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps(summary))

    def sigs(*args: str) -> list[str]:
        code, out, _ = report(capsys, "show", str(p), "--brief", *args)
        assert code == 0
        return re.findall(r"\] (\S+): T ", out)

    assert sigs() == ["A+B", "h1", "x1"]
    assert sigs("--class", "A") == ["A+B"]
    assert sigs("--class", "B") == ["A+B"]  # B/1 is a subclass of B
    assert sigs("--class", "C") == []  # named in the text, but not on the cycle
    assert sigs("--class", "D") == ["h1"]  # from extra
    assert sigs("--class", "slab_mutex") == ["x1"]  # a whole word: not memcg_slab_mutex
    assert sigs("--class", "memcg_slab_mutex") == ["h1"]
    code, out, _ = report(capsys, "show", str(p), "--kind", "hung_task")
    assert "=== hung_task: 1 signature, 2 occurrences ===" in out and "A+B" not in out
    assert "(filter: kind hung_task; 3 in all)" in out.splitlines()[0]


def test_show_unknown_kind_is_a_usage_error(runs, capsys):
    code, _, err = report(capsys, "show", runs["v3.6"], "--kind", "circular")
    one_line_error(code, err, "unknown --kind 'circular'")


# --------------------------------------------------------------------------------- graph
def test_graph_is_dot_with_red_cycle_edges_labelled_by_call_site(runs, capsys, tmp_path):
    code, out, _ = report(capsys, "graph", runs["v3.6"])
    assert code == 0 and out.startswith('digraph "v3.6" {')
    edges = {(m[0], m[1]): m[2] for m in
             re.findall(r'^  "([^"]+)" -> "([^"]+)" \[(.*)\];$', out, re.M)}
    cycle = [("slab_mutex", "rcu_barrier_mutex"), ("rcu_barrier_mutex", "cpu_hotplug.lock"),
             ("cpu_hotplug.lock", "slab_mutex")]
    for key in cycle:
        assert "color=red" in edges[key], key
    assert "color=red" not in edges[("cpu_add_remove_lock", "cpu_hotplug.lock")]
    # labelled with the call site where the edge was first seen (the inner acquisition)
    assert re.search(r'label="barrier \[update\.py:\d+\]"',
                     edges[("slab_mutex", "rcu_barrier_mutex")])
    assert re.search(r'label="slab_cpu_callback \[slab_common\.py:\d+\]"',
                     edges[("cpu_hotplug.lock", "slab_mutex")])
    dot = tmp_path / "g.dot"
    assert report(capsys, "graph", runs["v3.6"], "-o", str(dot)) == (0, "", "")
    assert dot.read_text() == out
    # --cycles keeps the cycle only; --class one class's neighbourhood
    _, cyc, _ = report(capsys, "graph", runs["v3.6"], "--cycles")
    assert cyc.count(" -> ") == 3 and "cpu_add_remove_lock" not in cyc
    _, near, _ = report(capsys, "graph", runs["v3.6"], "--class", "cpu_add_remove_lock")
    assert near.count(" -> ") == 1 and "slab_mutex" not in near


def test_graph_svg_without_graphviz_is_one_line_exit_2(runs, tmp_path):
    empty = tmp_path / "nobin"
    empty.mkdir()
    out = tmp_path / "g.svg"
    r = run_cli("report", "graph", runs["v3.6"], "-o", str(out),
                env={**os.environ, "PATH": str(empty)})
    one_line_error(r.returncode, r.stderr, "Graphviz 'dot' is not installed")
    assert not out.exists() and r.stdout == ""


def _fake_dot(bindir, rc: int = 0) -> None:
    """A stand-in for Graphviz: records its arguments and input into the -o file."""
    bindir.mkdir()
    script = bindir / "dot"
    script.write_text(f"#!{sys.executable}\n"
                      "import sys\n"
                      f"if {rc}:\n    sys.stderr.write('syntax error in line 3\\n'); "
                      f"sys.exit({rc})\n"
                      "out = sys.argv[sys.argv.index('-o') + 1]\n"
                      "open(out, 'w').write(' '.join(sys.argv[1:]) + '\\n' + sys.stdin.read())\n")
    script.chmod(0o755)


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_graph_svg_png_go_through_graphviz_dot(runs, tmp_path, suffix):
    _fake_dot(tmp_path / "bin")
    out = tmp_path / f"g{suffix}"
    r = run_cli("report", "graph", runs["v3.6"], "-o", str(out),
                env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert r.returncode == 0, r.stderr
    args, dot = out.read_text().split("\n", 1)
    assert args == f"-T{suffix[1:]} -o {out}"
    assert dot.startswith('digraph "v3.6"') and "color=red" in dot


def test_graphviz_failure_is_one_line_exit_2(runs, tmp_path):
    _fake_dot(tmp_path / "bin", rc=1)
    r = run_cli("report", "graph", runs["v3.6"], "-o", str(tmp_path / "g.svg"),
                env={**os.environ, "PATH": str(tmp_path / "bin")})
    one_line_error(r.returncode, r.stderr, "Graphviz dot failed (exit 1): syntax error in line 3")


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="Graphviz not installed")
def test_graph_svg_with_real_graphviz(runs, tmp_path, capsys):
    out = tmp_path / "g.svg"
    assert report(capsys, "graph", runs["v3.6"], "-o", str(out))[0] == 0
    assert "<svg" in out.read_text() and "slab_mutex" in out.read_text()


# ---------------------------------------------------------------------------------- diff
def test_diff_v36_against_fixed_shows_the_2012_dependency_and_cycle_gone(runs, capsys):
    """The README's example. lockdep records slab_mutex -> cpu_hotplug.lock as the 2012 splat
    shows it, through rcu_barrier()'s mutex: slab_mutex -> rcu_barrier_mutex -> cpu_hotplug.lock
    (only the immediately held lock gets a direct edge)."""
    a, b = runs["v3.6"], runs["fixed"]
    code, out, err = report(capsys, "diff", a, b)
    assert code == 1 and err == ""
    assert out.startswith(f"--- A: {a} (kernel v3.6, seed 1)\n+++ B: {b} (kernel fixed, seed 1)")
    for line in ("  - slab_mutex -> rcu_barrier_mutex    [barrier [update.py:",
                 "  - rcu_barrier_mutex -> cpu_hotplug.lock    [get_online_cpus [hotplug2012.py:",
                 "  - cpu_hotplug.lock -> slab_mutex -> rcu_barrier_mutex -> cpu_hotplug.lock\n",
                 "  - [circular_locking] cpu_hotplug.lock+rcu_barrier_mutex+slab_mutex (x",
                 "  - cpu_hotplug.lock\n", "  + cpu_hotplug_lock\n"):
        assert line in out, line
    assert "+ [circular_locking]" not in out
    code, js, _ = report(capsys, "diff", a, b, "--json")
    d = json.loads(js)
    assert code == 1 and d["same"] is False
    removed = {(e["from"], e["to"]) for e in d["edges"]["removed"]}
    added = {(e["from"], e["to"]) for e in d["edges"]["added"]}
    assert {("slab_mutex", "rcu_barrier_mutex"), ("rcu_barrier_mutex", "cpu_hotplug.lock")
            } <= removed
    assert not any(f == "slab_mutex" and "hotplug" in t for f, t in added)
    assert d["cycles"] == {"removed": [["cpu_hotplug.lock", "slab_mutex", "rcu_barrier_mutex"]],
                           "added": []}
    assert [f["kind"] for f in d["findings"]["removed"]] == ["circular_locking"]
    assert d["findings"]["added"] == []
    # the dependency itself: slab_mutex leads to the hotplug lock in A, in B nothing does
    ga = json.load(open(os.path.join(a, "lockdep_graph.json")))
    gb = json.load(open(os.path.join(b, "lockdep_graph.json")))
    assert reaches(ga, "slab_mutex", "cpu_hotplug.lock")
    assert not reaches(gb, "slab_mutex", "cpu_hotplug_lock")
    assert reaches(gb, "cpu_hotplug_lock", "slab_mutex")  # the fixed order
    # reversed, the signs swap
    code, out, _ = report(capsys, "diff", b, a)
    assert "  + slab_mutex -> rcu_barrier_mutex" in out and "  + [circular_locking]" in out


def test_diff_v313_against_v316_shows_the_memcg_lock_order_change_of_seed_001(
        tmp_path, capsys):
    """The README's second example. 3.13 takes each memcg's slab_caches_mutex under
    slab_mutex (memcg_cache_list_add); seed 001 replaced it by one memcg_slab_mutex taken
    before slab_mutex (activate_kmem_mutex -> memcg_slab_mutex -> slab_mutex)."""
    dirs = {}
    for preset in ("v3.13", "v3.16"):
        d = dirs[preset] = str(tmp_path / preset)
        r = run_cli("--threads", "8", "--duration", "1.5", "--kernel", preset, "--seed", "1",
                    "--quiet", "--json", "--report", d)
        assert r.returncode in (0, 1), r.stderr
    code, out, err = report(capsys, "diff", dirs["v3.13"], dirs["v3.16"])
    assert code == 1 and err == ""
    for line in ("  - memcg->slab_caches_mutex\n", "  + memcg_slab_mutex\n",
                 "  - slab_mutex -> memcg->slab_caches_mutex    [memcg_cache_list_add [",
                 "  + memcg_slab_mutex -> slab_mutex    [",
                 "  + activate_kmem_mutex -> memcg_slab_mutex    ["):
        assert line in out, line
    d = json.loads(report(capsys, "diff", dirs["v3.13"], dirs["v3.16"], "--json")[1])
    added = {(e["from"], e["to"]) for e in d["edges"]["added"]}
    removed = {(e["from"], e["to"]) for e in d["edges"]["removed"]}
    assert ("slab_mutex", "memcg->slab_caches_mutex") in removed
    assert ("memcg_slab_mutex", "slab_mutex") in added
    gb = json.load(open(os.path.join(dirs["v3.16"], "lockdep_graph.json")))
    assert not reaches(gb, "slab_mutex", "memcg_slab_mutex")  # the new order only


def test_diff_of_a_run_with_itself_and_of_its_json_files(runs, capsys):
    a = runs["v3.6"]
    code, out, _ = report(capsys, "diff", a, os.path.join(a, "lockdep_graph.json"))
    assert code == 0 and out.rstrip().endswith("no differences")
    assert "dependencies: no change" in out and "findings: no change" in out
    code, out, _ = report(capsys, "diff", os.path.join(a, "summary.json"),
                          os.path.join(runs["fixed"], "lockdep_graph.json"))
    assert code == 1 and "  - slab_mutex -> rcu_barrier_mutex" in out


def test_diff_with_a_standalone_graph_compares_graphs_only(runs, capsys, tmp_path):
    merged = tmp_path / "m.json"
    report(capsys, "merge", runs["v3.6"], "-o", str(merged))
    code, out, _ = report(capsys, "diff", runs["v3.6"], str(merged))
    assert code == 0 and "dependencies: no change" in out
    assert f"(findings not compared: {merged} has no summary.json)" in out


# --------------------------------------------------------------------------------- merge
def test_merge_finds_the_abba_split_over_two_runs(tmp_path, capsys):
    ab = hand_report(str(tmp_path / "ab"), ("A", "B"))
    ba = hand_report(str(tmp_path / "ba"), ("B", "A"))
    for d in (ab, ba):  # neither run alone has a cycle
        assert json.load(open(os.path.join(d, "summary.json")))["findings"] == []
    out = tmp_path / "merged.json"
    code, text, err = report(capsys, "merge", ab, ba, "-o", str(out))
    assert code == 1 and err == ""
    m = json.loads(out.read_text())
    assert m["format"] == "kmemcg-lockdep-graph" and m["version"] == 1
    assert [r["run"] for r in m["merged_from"]] == [ab, ba]
    assert m["merged_from"][0]["kernel"] == "fixed" and m["merged_from"][0]["seed"] == 0
    assert {c["name"] for c in m["classes"]} >= {"A", "B"}
    assert {(e["from"], e["to"], e["run"]) for e in m["edges"]} >= {("A", "B", ab),
                                                                   ("B", "A", ba)}
    (cyc,) = m["cross_run_cycles"]
    assert cyc["classes"] == ["A", "B"]
    assert [(e["from"], e["to"], e["run"], e["runs"]) for e in cyc["edges"]] == [
        ("A", "B", ab, [ab]), ("B", "A", ba, [ba])]
    for e in cyc["edges"]:  # both edges' first-seen stacks, from this test's own call
        assert e["stack"][0][2] == "take_nested" and e["stack"][0][0] == "test_report_cli.py"
    assert ["A", "B"] in m["cycles"]
    # the text summary, with both stacks
    assert text.startswith(f"merged 2 runs into {out} and {tmp_path / 'merged.dot'}: ")
    assert "1 cycle (1 only in the merged graph)" in text
    assert "cross-run cycle #1: A -> B -> A" in text
    assert f"  A -> B    [first seen in run {ab}, " in text
    assert f"  B -> A    [first seen in run {ba}, " in text
    assert text.count("       take_nested [test_report_cli.py:") == 2
    # the DOT beside it: both edges red, labelled with the call site
    dot = (tmp_path / "merged.dot").read_text()
    for a, b in (("A", "B"), ("B", "A")):
        assert re.search(rf'"{a}" -> "{b}" \[label="take_nested \[test_report_cli\.py:\d+\]", '
                         r"color=red", dot), dot
    # and graph reads the merged file back
    assert report(capsys, "graph", str(out))[1] == dot


def test_merge_of_real_runs_has_no_cross_run_cycle(runs, tmp_path, capsys):
    out = tmp_path / "m"  # no .json suffix: the DOT goes to m.dot
    code, text, _ = report(capsys, "merge", runs["v3.6"], runs["fixed"], "-o", str(out))
    assert code == 0 and "(0 only in the merged graph)" in text
    m = json.loads(out.read_text())
    assert m["cross_run_cycles"] == [] and len(m["cycles"]) == 1
    assert (tmp_path / "m.dot").exists()
    by = {(e["from"], e["to"]): e for e in m["edges"]}
    assert by[("slab_mutex", "rcu_barrier_mutex")]["runs"] == [runs["v3.6"]]
    assert by[("cpu_hotplug_lock", "slab_mutex")]["runs"] == [runs["fixed"]]


def test_merge_keeps_the_earliest_first_seen_stack_per_edge():
    def g(t: float, fn: str) -> dict:
        return {"classes": [{"name": "A"}, {"name": "B"}], "cycles": [], "edges": [
            {"from": "A", "to": "B", "thread": fn, "first_seen_s": t, "closes_cycle": False,
             "stack": [["x.py", 1, fn]]}]}

    m = G.merge([("late", g(0.5, "late_fn"), {}), ("early", g(0.2, "early_fn"), {}),
                 ("later", g(0.9, "later_fn"), {})])
    (e,) = m["edges"]
    assert (e["run"], e["stack"], e["first_seen_s"]) == ("early", [["x.py", 1, "early_fn"]], 0.2)
    assert e["runs"] == ["late", "early", "later"]
    assert m["cross_run_cycles"] == [] and m["cycles"] == []


def test_merge_finds_a_cross_run_cycle_behind_shorter_single_run_ones():
    """Run 1 has A -> B -> A; run 2 has B -> C -> B and A -> C -> A. Every edge's shortest
    cycle is one run's own, yet A -> B -> C -> A (and A -> C -> B -> A) need both runs."""
    def e(a: str, b: str) -> dict:
        return {"from": a, "to": b, "stack": [["f.py", 1, f"{a}{b}"]], "first_seen_s": 0.1}

    cls = [{"name": n} for n in "ABC"]
    g1 = {"classes": cls, "edges": [e("A", "B"), e("B", "A")], "cycles": [["B", "A"]]}
    g2 = {"classes": cls, "edges": [e("B", "C"), e("C", "B"), e("A", "C"), e("C", "A")],
          "cycles": [["C", "B"], ["A", "C"]]}
    m = G.merge([("r1", g1, {}), ("r2", g2, {})])
    cross = m["cross_run_cycles"]
    assert [c["classes"] for c in cross] == [["A", "B", "C"], ["A", "C", "B"]]
    assert [(x["from"], x["to"], x["run"]) for x in cross[0]["edges"]] == [
        ("A", "B", "r1"), ("B", "C", "r2"), ("C", "A", "r2")]
    assert m["cycles"] == [["A", "B"], ["B", "C"], ["A", "C"], ["A", "B", "C"], ["A", "C", "B"]]
    # a cycle one run has whole is not cross-run, even if another run saw one of its edges
    g3 = {"classes": cls, "edges": [e("A", "B")], "cycles": []}
    assert G.merge([("r1", g1, {}), ("r3", g3, {})])["cross_run_cycles"] == []


def test_merged_graphs_merge_again(tmp_path, capsys):
    ab = hand_report(str(tmp_path / "ab"), ("A", "B"))
    bc = hand_report(str(tmp_path / "bc"), ("B", "C"))
    ca = hand_report(str(tmp_path / "ca"), ("C", "A"))
    m1 = tmp_path / "m1.json"
    assert report(capsys, "merge", ab, bc, "-o", str(m1))[0] == 0  # A -> B -> C: no cycle
    code, text, _ = report(capsys, "merge", str(m1), ca, "-o", str(tmp_path / "m2.json"))
    assert code == 1 and "cross-run cycle #1: A -> B -> C -> A" in text
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert [r["run"] for r in m2["merged_from"]] == [ab, bc, ca]
    assert [e["run"] for e in m2["cross_run_cycles"][0]["edges"]] == [ab, bc, ca]


# ------------------------------------------------------------------------------ lockstat
def test_lockstat_table_is_sorted_by_contentions(tmp_path, capsys):
    def row(name: str, con: int, acq: int) -> dict:
        return {"class": name, "contentions": con, "acquisitions": acq, "con_bounces": con,
                "waittime_total_us": 1.5 * con, "contention_points": {"f [x.py:1]": con}
                if con else {}}

    p = tmp_path / "lock_stat.json"
    p.write_text(json.dumps({"format": "kmemcg-lock-stat", "version": 1, "lock_stat": True,
                             "classes": [row("few", 5, 10), row("idle", 0, 0),
                                         row("most", 50, 3), row("uncontended", 0, 100),
                                         row("tie_b", 5, 20)]}))
    code, out, _ = report(capsys, "lockstat", str(p))
    assert code == 0 and out.startswith("lock_stat version 0.4\n")
    names = re.findall(r"^ +(\S+): ", out, re.M)
    assert names == ["most", "tie_b", "few", "uncontended"]  # then by acquisitions; idle hidden
    assert re.search(r"^ +most +50 +\[contention point\] f \[x\.py:1\]$", out, re.M)
    assert re.findall(r"^ +(\S+): ", report(capsys, "lockstat", str(p), "--top", "2")[1],
                      re.M) == ["most", "tie_b"]


def test_lockstat_of_real_runs(runs, capsys):
    for name in ("v3.6", "fixed"):
        code, out, _ = report(capsys, "lockstat", runs[name])
        assert code == 0
        rows = re.findall(r"^ +(\S+): +(\d+) +(\d+) ", out, re.M)
        assert rows, out
        con = [int(c) for _, _, c in rows]
        assert con == sorted(con, reverse=True)
        assert ("lock_stat was off" in out) is (name == "fixed")
    assert re.search(r"^ +slab_mutex: ", report(capsys, "lockstat", runs["v3.6"])[1], re.M)


# -------------------------------------------------------------------------------- errors
def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file or directory"),
    ("not_json", "not JSON (Expecting value"),
    ("foreign", "not a kmemcg stress report (format 'chrome-trace'"),
    ("no_format", "not a kmemcg stress report (no \"format\" field"),
    ("bad_version", "unsupported kmemcg-stress-report version 2 (this tool reads version 1)"),
    ("string_version", "unsupported kmemcg-lockdep-graph version '1'"),
    ("malformed", "malformed kmemcg-stress-report file (findings[0] has no valid 'count')"),
    ("bad_stack", "malformed kmemcg-lockdep-graph file (edges[0] has a malformed stack)"),
    ("empty_dir", "not a stress report directory (no summary.json"),
    ("corrupt_sibling", "summary.json: not JSON"),
    ("graph_only", "has no findings (a standalone kmemcg-lockdep-graph file"),
])
def test_unreadable_reports_are_one_line_exit_2(case, needle, tmp_path, capsys):
    edge = {"from": "A", "to": "B", "stack": [["f.py", 1]]}
    content = {
        "not_json": "kernel: BUG\n",
        "foreign": '{"format": "chrome-trace", "version": 1}',
        "no_format": "[1, 2]",
        "bad_version": '{"format": "kmemcg-stress-report", "version": 2}',
        "string_version": '{"format": "kmemcg-lockdep-graph", "version": "1"}',
        "malformed": json.dumps({"format": "kmemcg-stress-report", "version": 1, "findings": [
            {"kind": "k", "title": "t", "signature": "s", "text": ""}]}),
        "bad_stack": json.dumps({"format": "kmemcg-lockdep-graph", "version": 1,
                                 "classes": [], "edges": [edge]}),
        "graph_only": json.dumps({"format": "kmemcg-lockdep-graph", "version": 1,
                                  "classes": [], "edges": []}),
    }
    if case in content:
        path = _write(tmp_path / "x.json", content[case])
    elif case == "missing":
        path = str(tmp_path / "nope")
    elif case == "empty_dir":
        path = str(tmp_path)
    else:  # a report directory's graph file, whose summary.json beside it is corrupt
        d = hand_report(str(tmp_path / "rep"), ("A", "B"))
        _write(tmp_path / "rep" / "summary.json", "{")
        path = os.path.join(d, "lockdep_graph.json")
    code, out, err = report(capsys, "show", path)
    one_line_error(code, err, needle)
    assert out == ""


def test_other_subcommands_refuse_bad_input_the_same_way(tmp_path, capsys):
    rep = hand_report(str(tmp_path / "rep"), ("A", "B"))
    bad = _write(tmp_path / "bad.json", "{")
    os.remove(os.path.join(rep, "lock_stat.json"))  # a report from before lock_stat.json
    for args, needle in [
        (["graph", bad], "bad.json: not JSON"),
        (["diff", rep, bad], "bad.json: not JSON"),
        (["diff", str(tmp_path / "nope"), rep], "nope: no such file or directory"),
        (["merge", rep, bad, "-o", str(tmp_path / "m.json")], "bad.json: not JSON"),
        (["merge", rep, "-o", str(tmp_path / "no" / "m.json")], "cannot write"),
        (["graph", rep, "-o", str(tmp_path / "no" / "g.dot")], "cannot write"),
        (["lockstat", rep], f"has no lock statistics (no lock_stat.json in {rep})"),
        (["lockstat", rep, "--top", "0"], "--top must be at least 1, got 0"),
        (["merge", rep], "the following arguments are required: -o/--output"),
        ([], "choose a subcommand: show, graph, diff, merge, lockstat"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["show", rep, "--bogus"], "unrecognized arguments: --bogus"),
    ]:
        code, _, err = report(capsys, *args)
        one_line_error(code, err, needle)
    assert not os.path.exists(tmp_path / "m.json")


def test_errors_through_python_m_stress_have_no_traceback(tmp_path):
    r = run_cli("report", "show", _write(tmp_path / "x.json", '{"format": "x"}'))
    one_line_error(r.returncode, r.stderr, "not a kmemcg stress report (format 'x'")


# ---------------------------------------------------------------------------------- help
@pytest.mark.parametrize("cmd, options", [
    ([], ["show", "graph", "diff", "merge", "lockstat"]),
    (["show"], ["--kind KIND", "--class LOCKCLASS", "--brief", "PATH"]),
    (["graph"], ["-o FILE, --output FILE", "--cycles", "--class LOCKCLASS", "PATH"]),
    (["diff"], ["--json", "A ", "B "]),
    (["merge"], ["-o OUT, --output OUT", "PATH"]),
    (["lockstat"], ["--top N", "PATH"]),
])
def test_help_explains_every_option(cmd, options, capsys):
    code, out, _ = report(capsys, *cmd, "--help")
    assert code == 0
    lines = out.splitlines()
    lines = lines[lines.index("positional arguments:"):]  # past the usage lines
    for opt in options:
        i = next((i for i, ln in enumerate(lines) if ln.strip().startswith(opt)), None)
        assert i is not None, (opt, out)
        # its explanation: on the same line, or (after a long option) on the next
        said = lines[i].strip()[len(opt):].strip() or lines[i + 1].strip()
        assert len(said.split()) >= 3, (opt, said)
