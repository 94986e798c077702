"""A soak campaign's verdict and report: many stress runs (preset x seed x workload, spread
over pytest-xdist workers) judged against the bug catalog and merged into one report.

The lockdep side is stress/report's merge (:func:`stress.report.graphs.merge`): lockdep sees
one boot, so an ABBA split over two runs (A -> B in one worker, B -> A in another) is a cycle
only the merged graph has; it is reported with the stacks of both sides. Graphs are merged per
kernel (preset plus extra bug switches): a "cycle" joining two designs' graphs is no bug.

This module is the controller side of the soak plugin (:mod:`stress.pytest_soak`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from kmemcg.catalog import BY_NAME
from kmemcg.core import findings as F

FORMAT, VERSION = "kmemcg-campaign", 1


def allowed_kinds(bugs: list[str]) -> set[str]:
    """The finding kinds the catalog's detectors give for ``bugs`` (none for a fixed kernel)."""
    return {kind for b in bugs for kind in BY_NAME[b].detector}


def verdict(meta: dict[str, Any], findings: list[dict[str, Any]]) -> list[str]:
    """A fixed kernel must come out clean; a kernel with bugs must show only its bugs'
    detectors, and at least one of them."""
    bugs = list(meta.get("bugs", []))
    allowed = allowed_kinds(bugs)
    problems = []
    for f in findings:
        if f["kind"] not in allowed:
            problems.append(f"kernel {meta.get('kernel')} (bugs: {', '.join(bugs) or 'none'}) "
                            f"reported [{f['kind']}], which none of its bugs' detectors "
                            f"({', '.join(sorted(allowed)) or 'none'}) gives:\n{f['text']}")
    if bugs and not any(f["kind"] in allowed for f in findings):
        problems.append(f"kernel {meta.get('kernel')} carries {', '.join(bugs)} but no "
                        f"{' / '.join(sorted(allowed))} finding came out of "
                        f"{meta.get('duration_s', '?')} s (seed {meta.get('seed')}, workload "
                        f"{meta.get('workload')})")
    return problems


def _key(meta: dict[str, Any]) -> str:
    return str(meta.get("kernel")) + "".join("+" + b for b in meta.get("extra_bugs", []))


def build(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The campaign report (a JSON-able dict) from the recorded runs."""
    from stress.report import graphs as G

    labels: Counter = Counter()
    rows, groups = [], {}
    findings: dict[tuple[str, str], dict[str, Any]] = {}
    violations: list[str] = []
    for r in sorted(runs, key=lambda r: r["label"]):
        labels[r["label"]] += 1
        label = r["label"] if labels[r["label"]] == 1 else f"{r['label']}#{labels[r['label']]}"
        problems = verdict(r["meta"], r["findings"])
        violations += [f"{label}: {p}" for p in problems]
        rows.append({"label": label, "worker": r["worker"], "nodeid": r["nodeid"],
                     **r["meta"], "kinds": sorted({f["kind"] for f in r["findings"]}),
                     "ok": not problems})
        groups.setdefault(_key(r["meta"]), []).append((label, r))
        for f in r["findings"]:
            m = findings.setdefault((f["kind"], f["signature"]), {
                **{k: f[k] for k in ("kind", "title", "signature", "text")},
                "count": 0, "runs": []})
            m["count"] += f["count"]
            m["runs"].append(label)
    kernels = {}
    for key, members in sorted(groups.items()):
        bugs = members[0][1]["meta"].get("bugs", [])
        allowed = allowed_kinds(bugs)
        merged = G.merge([(label, r["graph"], {k: r["meta"].get(k) for k in
                                               ("kernel", "bugs", "seed", "workload")})
                          for label, r in members])
        cross = merged["cross_run_cycles"]
        if cross and F.CIRCULAR_LOCKING not in allowed:
            for c in cross:
                violations.append(f"{key}: cycle only the merged graph has: "
                                  f"{G.cycle_text(tuple(c['classes']))} (runs "
                                  f"{', '.join(e['run'] for e in c['edges'])})")
        kinds: Counter = Counter(k for _, r in members for k in {f["kind"] for f in r["findings"]})
        kernels[key] = {"bugs": bugs, "allowed_kinds": sorted(allowed), "runs": len(members),
                        "kinds": dict(sorted(kinds.items())),
                        "ok": all(row["ok"] for row in rows if row["label"] in
                                  {label for label, _ in members}) and not (
                            cross and F.CIRCULAR_LOCKING not in allowed),
                        "graph": merged}
    return {"format": FORMAT, "version": VERSION,
            "workers": sorted({r["worker"] for r in runs}), "runs": rows, "kernels": kernels,
            "findings": sorted(findings.values(), key=lambda f: (f["kind"], f["signature"])),
            "violations": violations}


def _n(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def headline(report: dict[str, Any], path: str | None = None) -> str:
    """The few lines the terminal summary shows."""
    runs = report["runs"]
    ops = sum(r.get("ops_per_s", 0) * r.get("duration_s", 0) for r in runs)
    secs = sum(r.get("duration_s", 0) for r in runs)
    out = [f"{_n(len(runs), 'stress run')} on {_n(len(report['workers']), 'worker')} "
           f"({', '.join(report['workers'])}): {secs:.1f} s, {ops:,.0f} ops\n"]
    for key, g in report["kernels"].items():
        cross = len(g["graph"]["cross_run_cycles"])
        kinds = ", ".join(f"{k} x{n}" for k, n in g["kinds"].items()) or "no findings"
        out.append(f"  {key:<10} {'ok  ' if g['ok'] else 'FAIL'} {_n(g['runs'], 'run'):<8} "
                   f"{kinds}; {_n(cross, 'cross-run cycle')}\n")
    if report["violations"]:
        out.append(f"{_n(len(report['violations']), 'violation')}: "
                   + report["violations"][0].splitlines()[0] + "\n")
    if path:
        out.append(f"campaign report: {os.path.join(path, 'campaign.txt')} "
                   f"(+ campaign.json, <kernel>/lockdep_graph.json)\n")
    return "".join(out)


def text(report: dict[str, Any], path: str) -> str:
    """campaign.txt: verdict per kernel, the runs, merged graphs, each finding once."""
    from stress.report.cli import merge_text

    out = ["kmemcg soak campaign\n", "=" * 20 + "\n", headline(report), "\n"]
    if report["violations"]:
        out.append("VIOLATIONS\n")
        out += [f"  - {v}\n" for v in report["violations"]]
        out.append("\n")
    out.append("runs:\n")
    for r in report["runs"]:
        out.append(f"  {r['label']:<32} {r['worker']:<6} exit {r.get('exit_code', '?')}  "
                   f"{r.get('ops_per_s', 0):>9,.0f} ops/s  "
                   f"{'ok  ' if r['ok'] else 'FAIL'} {', '.join(r['kinds']) or '-'}\n")
    for key, g in report["kernels"].items():
        d = os.path.join(path, key)
        out.append(f"\nkernel {key} (bugs: {', '.join(g['bugs']) or 'none'}; allowed: "
                   f"{', '.join(g['allowed_kinds']) or 'none'})\n")
        out.append(merge_text(g["graph"], os.path.join(d, "lockdep_graph.json"),
                              os.path.join(d, "lockdep_graph.dot")))
    out.append(f"\nfindings ({len(report['findings'])} distinct):\n")
    for f in report["findings"]:
        out.append(f"\n[{f['kind']}] {f['signature']} (x{f['count']} in "
                   f"{_n(len(f['runs']), 'run')}: {', '.join(f['runs'])})\n{f['text']}\n")
    return "".join(out)


def write(path: str, report: dict[str, Any]) -> None:
    """DIR/campaign.json, DIR/campaign.txt, DIR/<kernel>/lockdep_graph.{json,dot} (the last
    readable by ``python -m stress report graph DIR/<kernel>``)."""
    from kmemcg.locking.lockdep_proc import graph_dot

    os.makedirs(path, exist_ok=True)
    for key, g in report["kernels"].items():
        d = os.path.join(path, key)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "lockdep_graph.json"), "w") as fh:
            fh.write(json.dumps(g["graph"], indent=1) + "\n")
        with open(os.path.join(d, "lockdep_graph.dot"), "w") as fh:
            fh.write(graph_dot(g["graph"], f"campaign {key}"))
    with open(os.path.join(path, "campaign.json"), "w") as fh:
        fh.write(json.dumps(report, indent=1) + "\n")
    with open(os.path.join(path, "campaign.txt"), "w") as fh:
        fh.write(text(report, path))
