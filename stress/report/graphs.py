"""Arithmetic on lockdep's JSON graph (:func:`kmemcg.locking.lockdep_proc.graph_json`): the
union of many runs' graphs, the cycles only that union has, subgraphs, and two runs' difference.

Lockdep sees one boot. An ABBA split over two runs (A -> B taken in one, B -> A in the other)
never meets in one graph, so neither run reports it; the merged graph does. Cycles are looked
for the way check_noncircular() looks when an edge is added: for each edge prev -> next, the
shortest path next -> ... -> prev (BFS). To find a cross-run cycle behind a shorter one that a
single run already has, the search is repeated with each of the edge's runs' own edges left
out. That finds every cross-run cycle made of one run's edges closing another's (the ABBA
case); a cycle that needs edges of three runs interleaved may still be hidden behind shorter
ones.

Pure functions on plain dicts: no kernel, no I/O.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any

from kmemcg.locking.lockdep_proc import GRAPH_FORMAT, GRAPH_VERSION

Key = tuple[str, str]  # (from, to)
Cycle = tuple[str, ...]  # classes in edge order, rotated to start at the smallest name

_INF = float("inf")


def canon(cycle: Iterable[str]) -> Cycle:
    """One spelling per cycle: the same ring read from its smallest class."""
    c = list(cycle)
    if not c:
        return ()
    i = c.index(min(c))
    return tuple(c[i:] + c[:i])


def cycle_keys(cycle: Cycle) -> list[Key]:
    """The edges of a cycle, the closing one last."""
    return [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def graph_cycles(graph: dict[str, Any]) -> list[Cycle]:
    """The graph's cycles (from its findings), each once, in first-reported order."""
    out: dict[Cycle, None] = {}
    for c in graph.get("cycles", []):
        if c:
            out.setdefault(canon(c), None)
    return list(out)


def cycle_text(cycle: Cycle) -> str:
    return " -> ".join((*cycle, cycle[0]))


def _bfs(adj: dict[str, list[str]], src: str, dst: str, banned: frozenset[Key]
         ) -> list[str] | None:
    """Shortest path src -> ... -> dst not using ``banned`` edges (nodes, src and dst included)."""
    parent: dict[str, str | None] = {src: None}
    todo = deque([src])
    while todo:
        x = todo.popleft()
        for n in adj.get(x, ()):
            if n in parent or (x, n) in banned:
                continue
            parent[n] = x
            if n == dst:
                path = [n]
                p = parent[n]
                while p is not None:
                    path.append(p)
                    p = parent[p]
                return path[::-1]
            todo.append(n)
    return None


def cross_run_cycles(edges: dict[Key, dict[str, Any]]) -> dict[Cycle, list[dict[str, Any]]]:
    """Cycles of the merged graph no single run has all the edges of. ``edges`` carry "runs"
    (every run that saw them); the result maps each cycle to its edges, closing edge last."""
    adj: dict[str, list[str]] = defaultdict(list)
    by_run: dict[str, set[Key]] = defaultdict(set)
    for (u, v), e in edges.items():
        adj[u].append(v)
        for r in e["runs"]:
            by_run[r].add((u, v))
    frozen = {r: frozenset(s) for r, s in by_run.items()}
    found: dict[Cycle, list[dict[str, Any]]] = {}
    for (u, v), e in edges.items():
        if u == v:
            continue
        for banned in [frozenset()] + [frozen[r] for r in e["runs"]]:
            path = _bfs(adj, v, u, banned)
            if path is None:
                continue
            cyc = canon([u] + path[:-1])
            if cyc in found:
                continue
            keys = cycle_keys(cyc)
            if not set.intersection(*(set(edges[k]["runs"]) for k in keys)):
                found[cyc] = [edges[k] for k in keys]
    return found


def merge(runs: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """One graph from many: ``runs`` is [(label, graph, meta)]. Classes and edges are united;
    each edge keeps its earliest first-seen stack, says which run that came from ("run") and
    lists every run that saw it ("runs"). Merged graphs may be merged again."""
    classes: dict[str, dict[str, Any]] = {}
    edges: dict[Key, dict[str, Any]] = {}
    seen_by: dict[Key, dict[str, None]] = defaultdict(dict)
    cycles: dict[Cycle, None] = {}
    merged_from: list[dict[str, Any]] = []
    for label, g, meta in runs:
        merged_from.extend(g.get("merged_from") or [{"run": label, **meta}])
        for c in g["classes"]:
            classes.setdefault(c["name"], c)
        for e in g["edges"]:
            key = (e["from"], e["to"])
            run = e.get("run", label)
            for r in e.get("runs", [run]):
                seen_by[key][r] = None
            old = edges.get(key)
            closes = bool(e.get("closes_cycle")) or bool(old and old.get("closes_cycle"))
            if old is None or e.get("first_seen_s", _INF) < old.get("first_seen_s", _INF):
                edges[key] = {**e, "run": run}
            edges[key]["closes_cycle"] = closes
        for c in graph_cycles(g):
            cycles.setdefault(c, None)
    for key, e in edges.items():
        e["runs"] = list(seen_by[key])
    cross = cross_run_cycles(edges)
    for c in cross:
        cycles.setdefault(c, None)
    return {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "classes": list(classes.values()),
        "edges": list(edges.values()),
        "cycles": [list(c) for c in cycles],
        "merged_from": merged_from,
        "cross_run_cycles": [{"classes": list(c), "edges": es} for c, es in cross.items()],
    }


def subgraph(graph: dict[str, Any], keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The edges ``keep`` accepts, the classes they join, and the cycles wholly inside them."""
    edges = [e for e in graph["edges"] if keep(e)]
    kept = {(e["from"], e["to"]) for e in edges}
    names = {n for e in edges for n in (e["from"], e["to"])}
    return {**graph,
            "classes": [c for c in graph["classes"] if c["name"] in names],
            "edges": edges,
            "cycles": [list(c) for c in graph_cycles(graph)
                       if all(k in kept for k in cycle_keys(c))]}


def cycles_only(graph: dict[str, Any]) -> dict[str, Any]:
    on_cycle = {k for c in graph_cycles(graph) for k in cycle_keys(c)}
    return subgraph(graph, lambda e: (e["from"], e["to"]) in on_cycle)


def around(graph: dict[str, Any], cls: str) -> dict[str, Any]:
    """``cls`` with its direct dependencies and dependents."""
    return subgraph(graph, lambda e: cls in (e["from"], e["to"]))


def _split(a: list, b: list, key: Callable[[Any], Any]) -> dict[str, list]:
    ka, kb = {key(x) for x in a}, {key(x) for x in b}
    return {"removed": [x for x in a if key(x) not in kb],
            "added": [x for x in b if key(x) not in ka]}


def diff_graphs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, list]]:
    """Classes, dependencies (edges) and cycles only in ``a`` ("removed") or only in ``b``
    ("added")."""
    return {
        "classes": _split([c["name"] for c in a["classes"]], [c["name"] for c in b["classes"]],
                          lambda n: n),
        "edges": _split(a["edges"], b["edges"], lambda e: (e["from"], e["to"])),
        "cycles": _split([list(c) for c in graph_cycles(a)], [list(c) for c in graph_cycles(b)],
                         tuple),
    }


def diff_findings(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, list]:
    """Findings (by kind and signature) only in ``a`` ("removed") or only in ``b`` ("added")."""
    return _split(a, b, lambda f: (f["kind"], f["signature"]))
