"""``python -m stress report SUBCOMMAND``: review what stress runs found.

``show`` prints the findings in kernel format, grouped by kind and signature; ``graph`` renders
the lock dependency graph (DOT, or SVG/PNG through Graphviz); ``diff`` compares two runs;
``merge`` unites many runs' graphs and reports the cycles only the union has; ``lockstat``
prints the /proc/lock_stat table. Exit codes: 0 done; 1 ``diff`` found differences or ``merge``
found a cross-run cycle; 2 bad usage or an unreadable report (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from kmemcg.core import findings as F
from kmemcg.core.stacks import format_site, format_stack
from kmemcg.locking.lockdep_proc import graph_dot
from stress.args import Parser, UsageError
from stress.report import graphs as G
from stress.report.load import BY_FILE, GRAPH, SUMMARY, Report, ReportError

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2
KINDS = sorted(v for n, v in vars(F).items() if n.isupper() and isinstance(v, str))
GRAPHVIZ = {".svg": "svg", ".png": "png"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m stress report",
                description="Review what stress runs found: findings, the lock dependency "
                            "graph, the difference of two runs, the union of many, lock "
                            "statistics. Exit codes: 0 done; 1 diff found differences or merge "
                            "found a cross-run cycle; 2 bad usage or an unreadable report.",
                epilog="PATH is a report directory written by --report DIR, or one of its "
                       "JSON files. Run SUBCOMMAND --help for its options.")
    sub = p.add_subparsers(dest="cmd", metavar="SUBCOMMAND")
    s = sub.add_parser("show", help="findings grouped by kind and signature, in kernel format",
                       description="Print a run's findings, grouped by kind and signature, "
                                   "with counts and the kernel-format text.")
    s.add_argument("path", metavar="PATH", help="report directory or its summary.json")
    s.add_argument("--kind", action="append", default=[], metavar="KIND",
                   help="only findings of this kind, e.g. circular_locking (repeatable)")
    s.add_argument("--class", dest="classes", action="append", default=[], metavar="LOCKCLASS",
                   help="only findings involving this lock class (a circular one: on its cycle)")
    s.add_argument("--brief", action="store_true",
                   help="one line per finding, without the kernel text")
    g = sub.add_parser("graph", help="the lock dependency graph as DOT, SVG or PNG",
                       description="Render a run's (or a merged) lock dependency graph: cycle "
                                   "edges red, edges labelled with their first-seen call site.")
    g.add_argument("path", metavar="PATH", help="report directory, or a graph JSON file")
    g.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (.svg/.png through Graphviz dot; else DOT); default stdout")
    g.add_argument("--cycles", action="store_true", help="only the edges that lie on a cycle")
    g.add_argument("--class", dest="cls", metavar="LOCKCLASS",
                   help="only this class with its direct dependencies and dependents")
    d = sub.add_parser("diff", help="what changed between two runs",
                       description="Dependencies, classes, cycles and findings only in A (-) "
                                   "or only in B (+). Exit 0 if none, 1 if any.")
    d.add_argument("a", metavar="A", help="first run: report directory or JSON file")
    d.add_argument("b", metavar="B", help="second run: report directory or JSON file")
    d.add_argument("--json", action="store_true", help="print the difference as one JSON object")
    m = sub.add_parser("merge", help="one graph from many runs, with its cross-run cycles",
                       description="Unite the lock dependency graphs of many runs; report the "
                                   "cycles no single run has. Exit 1 if there is one.")
    m.add_argument("paths", nargs="+", metavar="PATH", help="report directories or graph files")
    m.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="merged graph JSON to write; its DOT goes beside it (OUT.dot)")
    ls = sub.add_parser("lockstat", help="the /proc/lock_stat table, by contentions",
                        description="Print a run's per-class lock statistics, most contended "
                                    "first.")
    ls.add_argument("path", metavar="PATH", help="report directory or its lock_stat.json")
    ls.add_argument("--top", type=int, default=None, metavar="N", help="only the N first classes")
    return p


# ---------------------------------------------------------------------------------- show
def _mentions(text: str, cls: str) -> bool:
    # A class name as a whole word: "slab_mutex" must match neither "memcg_slab_mutex" nor
    # "slab_mutex.lock" (class names have dots), but may end a sentence or take a "/subclass".
    return re.search(r"(?<![\w.])" + re.escape(cls) + r"(?!\w|\.\w)", text) is not None


def _strings(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


def involves(f: dict[str, Any], cls: str) -> bool:
    """Does finding ``f`` concern lock class ``cls``? A finding naming its classes (lockdep's:
    a circular one names its cycle) is matched on those alone; any other on its extra fields
    and its text."""
    extra = f.get("extra") or {}
    named = extra.get("classes") if isinstance(extra, dict) else None
    if isinstance(named, list):
        return any(c == cls or c.split("/")[0] == cls for c in named if isinstance(c, str))
    return any(_mentions(s, cls) for s in _strings(extra) + [f["text"]])


def cmd_show(a: argparse.Namespace) -> int:
    r = Report(a.path)
    findings = r.summary()["findings"]
    known = set(KINDS) | {f["kind"] for f in findings}
    for k in a.kind:
        if k not in known:
            raise UsageError(f"unknown --kind {k!r} (kinds: {', '.join(sorted(known))})")
    shown = [f for f in findings if (not a.kind or f["kind"] in a.kind)
             and all(involves(f, c) for c in a.classes)]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for f in shown:
        by_kind.setdefault(f["kind"], []).append(f)
    filt = [f"kind {k}" for k in a.kind] + [f"class {c}" for c in a.classes]
    out = [f"report {r.describe()}: {_n(len(shown), 'finding')}, "
           f"{_n(sum(f['count'] for f in shown), 'occurrence')}"
           + (f" (filter: {', '.join(filt)}; {len(findings)} in all)" if filt else "") + "\n"]
    for kind, fs in by_kind.items():
        if a.brief:
            out.extend(f"  x{f['count']:<6} [{kind}] {f['signature']}: {f['title']}\n"
                       for f in fs)
            continue
        out.append(f"\n=== {kind}: {_n(len(fs), 'signature')}, "
                   f"{_n(sum(f['count'] for f in fs), 'occurrence')} ===\n")
        for f in fs:
            first = f.get("first_seen_s")
            when = f", first at {first:.3f}s" if isinstance(first, int | float) else ""
            out.append(f"\n--- {f['signature']}: seen {_n(f['count'], 'time')}{when} in "
                       f"{f.get('thread', '?')}\n{f['text'].rstrip()}\n")
    sys.stdout.write("".join(out))
    return EXIT_OK


def _n(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# --------------------------------------------------------------------------------- graph
def _title(r: Report) -> str:
    name = os.path.basename(r.label) or r.label
    if name in BY_FILE:  # DIR/lockdep_graph.json: the run is DIR
        name = os.path.basename(os.path.dirname(os.path.abspath(r.label))) or name
    return name[:-5] if name.endswith(".json") else name


def cmd_graph(a: argparse.Namespace) -> int:
    r = Report(a.path)
    graph = r.graph()
    if a.cycles:
        graph = G.cycles_only(graph)
    if a.cls:
        graph = G.around(graph, a.cls)
    text = graph_dot(graph, _title(r))
    if not a.output:
        sys.stdout.write(text)
        return EXIT_OK
    fmt = GRAPHVIZ.get(os.path.splitext(a.output)[1].lower())
    if fmt is None:
        _write(a.output, text)
        return EXIT_OK
    dot = shutil.which("dot")
    if dot is None:
        raise ReportError(f"{a.output}: Graphviz 'dot' is not installed (not on PATH); "
                          "write a .dot file instead")
    try:
        p = subprocess.run([dot, f"-T{fmt}", "-o", a.output], input=text, text=True,
                           capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ReportError(f"{a.output}: running Graphviz dot failed: {e}") from None
    if p.returncode:
        err = (p.stderr.strip().splitlines() or ["no message"])[0]
        raise ReportError(f"{a.output}: Graphviz dot failed (exit {p.returncode}): {err}")
    return EXIT_OK


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as e:
        raise ReportError(f"{path}: cannot write: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------- diff
def site(e: dict[str, Any]) -> str:
    return format_site(tuple(e["stack"][0])) if e["stack"] else "?"


def edge_line(e: dict[str, Any], at_site: bool = True) -> str:
    """``from -> to    [call site; first seen in thread at T]``."""
    t = e.get("first_seen_s")
    when = f" at {t:.3f}s" if isinstance(t, int | float) else ""
    run = f"run {e['run']}, " if "run" in e else ""
    where = f"{site(e)}; " if at_site else ""
    return (f"{e['from']} -> {e['to']}    [{where}first seen in {run}"
            f"{e.get('thread', '?')}{when}]")


def cmd_diff(a: argparse.Namespace) -> int:
    ra, rb = Report(a.a), Report(a.b)
    out: dict[str, Any] = {"a": ra.label, "b": rb.label}
    notes = []
    if ra.has(GRAPH) and rb.has(GRAPH):
        out.update(G.diff_graphs(ra.graph(), rb.graph()))
    else:
        missing = ra if not ra.has(GRAPH) else rb
        notes.append(f"dependencies not compared: {missing.label} has no lock dependency graph")
        out.update(classes=None, edges=None, cycles=None)
    if ra.has(SUMMARY) and rb.has(SUMMARY):
        out["findings"] = G.diff_findings(ra.summary()["findings"], rb.summary()["findings"])
    else:
        missing = ra if not ra.has(SUMMARY) else rb
        notes.append(f"findings not compared: {missing.label} has no summary.json")
        out["findings"] = None
    sections = [out[k] for k in ("classes", "edges", "cycles", "findings")]
    if all(s is None for s in sections):
        raise ReportError(f"{ra.label} and {rb.label}: nothing to compare")
    out["same"] = not any(s and (s["added"] or s["removed"]) for s in sections)
    if a.json:
        print(json.dumps(out))
    else:
        sys.stdout.write(diff_text(ra, rb, out, notes))
    return EXIT_OK if out["same"] else EXIT_DIFFERENT


def diff_text(ra: Report, rb: Report, d: dict[str, Any], notes: list[str]) -> str:
    out = [f"--- A: {ra.describe()}\n+++ B: {rb.describe()}\n(- only in A, + only in B)\n"]
    render = {
        "classes": ("classes", lambda c: c),
        "edges": ("dependencies", edge_line),
        "cycles": ("cycles", lambda c: G.cycle_text(tuple(c))),
        "findings": ("findings", lambda f: f"[{f['kind']}] {f['signature']} (x{f['count']}): "
                                           f"{f['title']}"),
    }
    for key, (name, fmt) in render.items():
        s = d[key]
        if s is None:
            continue
        if not s["removed"] and not s["added"]:
            out.append(f"\n{name}: no change\n")
            continue
        out.append(f"\n{name}: {len(s['removed'])} only in A, {len(s['added'])} only in B\n")
        out.extend(f"  - {fmt(x)}\n" for x in s["removed"])
        out.extend(f"  + {fmt(x)}\n" for x in s["added"])
    out.extend(f"\n({n})\n" for n in notes)
    if d["same"]:
        out.append("\nno differences\n")
    return "".join(out)


# --------------------------------------------------------------------------------- merge
def _meta(r: Report) -> dict[str, Any]:
    if not r.has(SUMMARY):
        return {}
    s = r.summary()
    return {k: s[k] for k in ("kernel", "bugs", "seed", "workload") if k in s}


def cmd_merge(a: argparse.Namespace) -> int:
    reports = [Report(p) for p in a.paths]
    labels: dict[str, int] = {}
    runs = []
    for r in reports:  # the same path twice still makes two runs
        labels[r.label] = labels.get(r.label, 0) + 1
        label = r.label if labels[r.label] == 1 else f"{r.label}#{labels[r.label]}"
        runs.append((label, r.graph(), _meta(r)))
    merged = G.merge(runs)
    base = a.output[:-5] if a.output.endswith(".json") else a.output
    dot_path = base + ".dot"
    _write(a.output, json.dumps(merged, indent=1) + "\n")
    _write(dot_path, graph_dot(merged, "merged"))
    sys.stdout.write(merge_text(merged, a.output, dot_path))
    return EXIT_DIFFERENT if merged["cross_run_cycles"] else EXIT_OK


def merge_text(m: dict[str, Any], out: str, dot_path: str) -> str:
    cross = m["cross_run_cycles"]
    lines = [f"merged {_n(len(m['merged_from']), 'run')} into {out} and {dot_path}: "
             f"{_n(len(m['classes']), 'class', 'classes')}, "
             f"{_n(len(m['edges']), 'dependency', 'dependencies')}, "
             f"{_n(len(m['cycles']), 'cycle')} ({len(cross)} only in the merged graph)\n"]
    for i, c in enumerate(cross, 1):
        lines.append(f"\ncross-run cycle #{i}: {G.cycle_text(tuple(c['classes']))}\n")
        for e in c["edges"]:
            lines.append(f"  {edge_line(e, at_site=False)}:\n")
            lines.append(format_stack([tuple(f) for f in e["stack"]]))
    return "".join(lines)


# ------------------------------------------------------------------------------ lockstat
STAT_COLS = (("con-bounces", "con_bounces"), ("contentions", "contentions"),
             ("waittime-min", "waittime_min_us"), ("waittime-max", "waittime_max_us"),
             ("waittime-total", "waittime_total_us"), ("waittime-avg", "waittime_avg_us"),
             ("acq-bounces", "acq_bounces"), ("acquisitions", "acquisitions"),
             ("holdtime-min", "holdtime_min_us"), ("holdtime-max", "holdtime_max_us"),
             ("holdtime-total", "holdtime_total_us"), ("holdtime-avg", "holdtime_avg_us"))


def lockstat_text(data: dict[str, Any], top: int | None) -> str:
    rows = [c for c in data["classes"] if c["contentions"] or c["acquisitions"]]
    rows.sort(key=lambda c: (-c["contentions"], -c["acquisitions"], c["class"]))
    rows = rows[:top] if top is not None else rows
    rule = "-" * (40 + 15 * len(STAT_COLS))
    out = []
    if not data.get("lock_stat"):
        out.append("# lock_stat was off in this run (--lock-stat): contentions and wait times "
                   "only\n")
    out += ["lock_stat version 0.4\n", rule + "\n",
            f"{'class name':>40}" + "".join(f"{h:>15}" for h, _ in STAT_COLS) + "\n", rule + "\n"]
    for c in rows:
        name = c["class"]
        vals = [c.get(k, 0) for _, k in STAT_COLS]
        out.append("\n" + f"{name + ':':>40}" + "".join(
            f"{v:>15}" if isinstance(v, int) else f"{v:>15.2f}" for v in vals) + "\n")
        for title, key in (("contention point", "contention_points"),
                           ("contending from", "contending_points")):
            points = c.get(key) or {}
            if points:
                out.append(f"{'-' * len(name):>40}\n")
                out.extend(f"{name:>40}{n:>15}          [{title}] {where}\n"
                           for where, n in points.items())
    if not rows:
        out.append("\n(no lock was taken or contended)\n")
    return "".join(out) + "\n"


def cmd_lockstat(a: argparse.Namespace) -> int:
    if a.top is not None and a.top < 1:
        raise UsageError(f"--top must be at least 1, got {a.top}")
    sys.stdout.write(lockstat_text(Report(a.path).lock_stat(), a.top))
    return EXIT_OK


COMMANDS = {"show": cmd_show, "graph": cmd_graph, "diff": cmd_diff, "merge": cmd_merge,
            "lockstat": cmd_lockstat}


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:  # --help printed
            return e.code if isinstance(e.code, int) else EXIT_OK
        if a.cmd is None:
            raise UsageError(f"choose a subcommand: {', '.join(COMMANDS)} (see --help)")
        return COMMANDS[a.cmd](a)
    except (UsageError, ReportError) as e:
        print(f"stress report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `report show ... | head`: no traceback at exit's flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
