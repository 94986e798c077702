"""Lockdep introspection: /proc/lockdep, /proc/lockdep_stats, /proc/lockdep_chains, and the
dependency graph exported as JSON and as Graphviz DOT.

The JSON export is the stable interchange format that reports, diffs and merges of many runs
read back (``GRAPH_FORMAT`` / ``GRAPH_VERSION``); the DOT export labels each edge with the call
site where it was first seen and draws cycle-closing edges in red.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kmemcg.core.stacks import format_site

if TYPE_CHECKING:
    from kmemcg.locking.lockdep import LockClass, Lockdep

GRAPH_FORMAT = "kmemcg-lockdep-graph"
GRAPH_VERSION = 1


def proc_lockdep(ld: Lockdep) -> str:
    """/proc/lockdep: each class with its forward/backward dependency counts and its direct
    dependencies. FD/BD count every class reachable forward/backward, as the kernel does."""
    out = ["all lock classes:\n"]
    for c in list(ld.classes):
        fd = len(_reach(c, "after"))
        bd = len(_reach(c, "before"))
        out.append(f"{c.idx:016x} FD:{fd:5d} BD:{bd:5d} {c.usage[1:5]}: {c.display}\n")
        for n in list(c.after):
            out.append(f" -> [{n.idx:016x}] {n.display}\n")
        out.append("\n")
    return "".join(out)


def _reach(c: LockClass, direction: str) -> set[LockClass]:
    seen: set[LockClass] = set()
    todo = [c]
    while todo:
        x = todo.pop()
        for n in list(getattr(x, direction)):
            if n not in seen and n is not c:
                seen.add(n)
                todo.append(n)
    return seen


def proc_lockdep_stats(ld: Lockdep) -> str:
    """/proc/lockdep_stats."""
    from kmemcg.locking.lockdep import MAX_LOCK_DEPTH
    k = ld._k
    rows = [
        ("lock-classes", f"{len(ld.classes)} [max: unlimited]"),
        ("direct dependencies", f"{ld.nr_edges} [max: unlimited]"),
        ("dependency chains", f"{ld.nr_chains()} [max: unlimited]"),
        ("chain-cache misses", str(ld.chain_misses)),
        ("stack-trace entries", f"{k.stacks.entries()} in {len(k.stacks)} stacks"),
        ("max locking depth", f"{ld.max_depth} [limit: {MAX_LOCK_DEPTH}]"),
        ("max bfs queue depth", str(ld.max_bfs_queue)),
        ("debug_locks", "1" if ld.enabled else "0"),
    ]
    return "".join(f" {name:<34}{val:>24}\n" for name, val in rows)


def proc_lockdep_chains(ld: Lockdep) -> str:
    """/proc/lockdep_chains: the held-class sequence of every validated chain."""
    out = []
    for i, names in enumerate(list(ld.chain_classes)):
        out.append(f"irq_context: 0\n[{i:016x}]\n")
        out.extend(f" {n}\n" for n in names)
        out.append("\n")
    return "".join(out)


def graph_json(ld: Lockdep) -> dict[str, Any]:
    """The dependency graph: classes, edges with their first-seen stacks, and the cycles."""
    edges = ld.edges()
    return {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "classes": [{"name": c.display, "kind": c.kind, "base": c.base, "subclass": c.subclass}
                    for c in list(ld.classes)],
        "edges": [{
            "from": e.prev.display,
            "to": e.next.display,
            "thread": e.thread,
            "first_seen_s": round(e.time, 6),
            "closes_cycle": e.closes_cycle,
            "stack": [[os.path.basename(f), line, fn] for f, line, fn in e.stack],
        } for e in edges],
        "cycles": [f.extra.get("classes", []) for e in edges for f in e.findings],
    }


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_dot(graph: dict[str, Any], title: str = "lockdep") -> str:
    """DOT text of a graph in the JSON form above (so merged graphs render the same way)."""
    cyc = {frozenset(c) for c in graph.get("cycles", [])}
    in_cycle = {n for c in cyc for n in c}
    out = [f"digraph {_q(title)} {{\n", "  rankdir=LR;\n  node [shape=box, fontname=monospace];\n"]
    for c in graph["classes"]:
        attrs = ", color=red, penwidth=2" if c["name"] in in_cycle else ""
        out.append(f"  {_q(c['name'])} [label={_q(c['name'])}{attrs}];\n")
    for e in graph["edges"]:
        top = e["stack"][0] if e["stack"] else None
        label = format_site(tuple(top)) if top else ""
        red = e.get("closes_cycle") or any(
            e["from"] in c and e["to"] in c for c in cyc)
        attrs = ", color=red, penwidth=2" if red else ""
        out.append(f"  {_q(e['from'])} -> {_q(e['to'])} [label={_q(label)}{attrs}];\n")
    out.append("}\n")
    return "".join(out)
