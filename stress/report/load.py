"""Reading a stress report back: a report directory, or one of its JSON files.

Every JSON file a run writes names its ``format`` and ``version``; a file is refused, with one
line saying why, when it is not JSON, names a foreign format, carries a version this tool does
not read, or lacks the fields the subcommands use. Nothing here prints or exits: the command
line turns :class:`ReportError` into its one-line error.

A directory gives its ``summary.json`` (findings), ``lockdep_graph.json`` and
``lock_stat.json``; a file with one of those names gives its siblings too, so ``report show
DIR/summary.json`` and ``report graph DIR/summary.json`` both work. A file under another name
(a merged graph, say) stands alone.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kmemcg.locking.lockdep_proc import GRAPH_FORMAT, GRAPH_VERSION
from stress.reporting import LOCK_STAT_FORMAT, LOCK_STAT_VERSION, REPORT_FORMAT, REPORT_VERSION

SUMMARY, GRAPH, LOCK_STAT = "summary.json", "lockdep_graph.json", "lock_stat.json"

# format -> (the file name a report directory gives it, the versions this tool reads)
FORMATS: dict[str, tuple[str, frozenset[int]]] = {
    REPORT_FORMAT: (SUMMARY, frozenset({REPORT_VERSION})),
    GRAPH_FORMAT: (GRAPH, frozenset({GRAPH_VERSION})),
    LOCK_STAT_FORMAT: (LOCK_STAT, frozenset({LOCK_STAT_VERSION})),
}
BY_FILE = {name: fmt for fmt, (name, _) in FORMATS.items()}
WHAT = {SUMMARY: "findings", GRAPH: "lock dependency graph", LOCK_STAT: "lock statistics"}


class ReportError(Exception):
    """A path that cannot be read as a report; the message is one line, naming the path."""


def read_json(path: str, want: str | None = None) -> dict[str, Any]:
    """Load one report JSON file and check its format, version and shape."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file or directory") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {_one_line(e)}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ReportError(f"{path}: not JSON ({_one_line(e)})") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in FORMATS:
        shown = f"format {fmt!r}" if fmt is not None else "no \"format\" field"
        raise ReportError(f"{path}: not a kmemcg stress report ({shown}; expected one of "
                          f"{', '.join(FORMATS)})")
    if want is not None and fmt != want:
        raise ReportError(f"{path}: a {fmt} file, expected {want}")
    versions = FORMATS[fmt][1]
    v = obj.get("version")
    if type(v) is not int or v not in versions:
        raise ReportError(f"{path}: unsupported {fmt} version {v!r} (this tool reads version "
                          f"{', '.join(map(str, sorted(versions)))})")
    problem = _shape_problem(fmt, obj)
    if problem:
        raise ReportError(f"{path}: malformed {fmt} file ({problem})")
    return obj


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _items(obj: dict[str, Any], key: str, fields: dict[str, type | tuple[type, ...]]
           ) -> str | None:
    """What is wrong with ``obj[key]`` as a list of dicts carrying ``fields``, if anything."""
    items = obj.get(key)
    if not isinstance(items, list):
        return f"{key!r} is not a list"
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            return f"{key}[{i}] is not an object"
        for name, typ in fields.items():
            if not isinstance(it.get(name), typ) or isinstance(it.get(name), bool):
                return f"{key}[{i}] has no valid {name!r}"
    return None


def _shape_problem(fmt: str, obj: dict[str, Any]) -> str | None:
    if fmt == REPORT_FORMAT:
        return _items(obj, "findings", {"kind": str, "title": str, "signature": str,
                                        "count": int, "text": str})
    if fmt == LOCK_STAT_FORMAT:
        return _items(obj, "classes", {"class": str, "contentions": int, "acquisitions": int})
    problem = (_items(obj, "classes", {"name": str})
               or _items(obj, "edges", {"from": str, "to": str, "stack": list}))
    if problem:
        return problem
    for i, e in enumerate(obj["edges"]):
        if not all(isinstance(f, list) and len(f) == 3 for f in e["stack"]):
            return f"edges[{i}] has a malformed stack"
    cycles = obj.get("cycles", [])
    if not isinstance(cycles, list) or not all(
            isinstance(c, list) and all(isinstance(n, str) for n in c) for c in cycles):
        return "'cycles' is not a list of class lists"
    return None


class Report:
    """One run's report, as given on the command line; files are read when first asked for."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path.rstrip("/") or path  # how output and merged graphs name this run
        self._dir: str | None = None
        self._files: dict[str, dict[str, Any]] = {}
        if os.path.isdir(path):
            self._dir = path
            if not any(os.path.exists(os.path.join(path, n)) for n in BY_FILE):
                raise ReportError(f"{path}: not a stress report directory (no {SUMMARY}, "
                                  f"{GRAPH} or {LOCK_STAT})")
        elif os.path.exists(path):
            obj = read_json(path)
            name = FORMATS[obj["format"]][0]
            self._files[name] = obj
            if os.path.basename(path) == name:  # a report directory's own file: siblings too
                self._dir = os.path.dirname(path) or "."
        else:
            raise ReportError(f"{path}: no such file or directory")

    def has(self, name: str) -> bool:
        return name in self._files or (
            self._dir is not None and os.path.exists(os.path.join(self._dir, name)))

    def get(self, name: str) -> dict[str, Any]:
        """The run's ``name`` file (SUMMARY, GRAPH or LOCK_STAT), checked."""
        if name not in self._files:
            if self._dir is None:
                raise ReportError(f"{self.path}: has no {WHAT[name]} (a standalone "
                                  f"{next(iter(self._files.values()))['format']} file; give "
                                  "the report directory)")
            if not self.has(name):
                raise ReportError(f"{self.path}: has no {WHAT[name]} (no {name} in "
                                  f"{self._dir})")
            self._files[name] = read_json(os.path.join(self._dir, name), BY_FILE[name])
        return self._files[name]

    def summary(self) -> dict[str, Any]:
        return self.get(SUMMARY)

    def graph(self) -> dict[str, Any]:
        return self.get(GRAPH)

    def lock_stat(self) -> dict[str, Any]:
        return self.get(LOCK_STAT)

    def describe(self) -> str:
        """``PATH (kernel v3.6, seed 1)`` when the summary is at hand, else the path."""
        if not self.has(SUMMARY):
            return self.label
        s = self.summary()
        bits = [f"{k} {s[k]}" for k in ("kernel", "seed") if k in s]
        return f"{self.label} ({', '.join(bits)})" if bits else self.label
