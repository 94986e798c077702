"""What a stress run leaves behind: the JSON summary, the human summary, the report directory.

The report directory is written by :func:`write_report_dir` from whatever the kernel holds at
that moment, so the caller can flush it on every way out of a run (normal end, Ctrl-C, a real
deadlock, an internal crash). Files: ``findings.txt`` (kernel-format text of every finding),
``summary.json``, ``lock_stat.txt``, ``lock_stat.json`` (the same figures per class, for
``python -m stress report lockstat``), ``lockdep.txt`` (/proc/lockdep + lockdep_stats),
``lockdep_graph.json`` and ``lockdep_graph.dot``. Every JSON file names its format and version.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import Any

from kmemcg import Kernel
from kmemcg.locking import lock_stat

REPORT_FORMAT = "kmemcg-stress-report"
REPORT_VERSION = 1
LOCK_STAT_FORMAT = "kmemcg-lock-stat"
LOCK_STAT_VERSION = 1


def summary(k: Kernel, *, seed: int, kernel: str, bugs: list[str], threads: int,
            duration_s: float, ops: Counter, exit_code: int, workload: str) -> dict[str, Any]:
    findings = k.findings.snapshot()
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "seed": seed,
        "kernel": kernel,
        "bugs": bugs,
        "workload": workload,
        "threads": threads,
        "duration_s": round(duration_s, 3),
        "ops": dict(sorted(ops.items())),
        "ops_per_s": round(sum(ops.values()) / duration_s, 1) if duration_s else 0.0,
        "findings": [f.to_dict() for f in findings],
        "lockdep": {
            "classes": len(k.lockdep.classes),
            "dependencies": k.lockdep.nr_edges,
            "chains": k.lockdep.nr_chains(),
            "max_depth": k.lockdep.max_depth,
        },
        "top_contended": top_contended(k),
        "rcu": dataclasses.asdict(k.rcu.statistics()),
        "memcg": {
            "memcgs_freed": k.memcg.freed,
            "memcg_caches_created": k.memcg_slab.nr_created,
            "memcg_caches_deactivated": k.memcg_slab.nr_deactivated,
        },
        "exit_code": exit_code,
    }


def top_contended(k: Kernel, n: int = 5) -> list[dict[str, Any]]:
    rows = []
    for c in list(k.lockdep.classes):
        if c.subclass or c.kind == "map":
            continue
        st = lock_stat.class_stat(c)
        if st.contentions:
            rows.append({"class": c.base, "contentions": st.contentions,
                         "wait_total_us": round(st.wait_total / 1e3, 1),
                         "wait_max_us": round(st.wait_max / 1e3, 1)})
    rows.sort(key=lambda r: -r["contentions"])
    return rows[:n]


def lock_stat_json(k: Kernel) -> dict[str, Any]:
    """/proc/lock_stat's figures per class (subclasses merged, as there), as JSON. Contentions
    and wait times are counted always; acquisitions and hold times only with lock_stat on."""
    classes = []
    for c in list(k.lockdep.classes):
        if c.subclass or c.kind == "map":
            continue
        classes.append({"class": c.base, "kind": c.kind, **lock_stat.class_stat(c).to_dict()})
    return {"format": LOCK_STAT_FORMAT, "version": LOCK_STAT_VERSION,
            "lock_stat": bool(k.lock_stat), "classes": classes}


def human_summary(s: dict[str, Any]) -> str:
    out = [f"\nstress: kernel {s['kernel']}, workload {s['workload']}, seed {s['seed']}, "
           f"{s['threads']} threads, {s['duration_s']:.1f} s\n",
           "\nops:\n"]
    for kind, n in s["ops"].items():
        out.append(f"  {kind:<20}{n:>12}\n")
    out.append(f"  {'total/s':<20}{s['ops_per_s']:>12.0f}\n")
    ld = s["lockdep"]
    out.append(f"\nlockdep: {ld['classes']} classes, {ld['dependencies']} dependencies, "
               f"{ld['chains']} chains, max depth {ld['max_depth']}\n")
    if s["top_contended"]:
        out.append("\ntop contended locks:\n")
        for r in s["top_contended"]:
            out.append(f"  {r['class']:<28}{r['contentions']:>10} contentions"
                       f"{r['wait_total_us']:>14.0f} us waited\n")
    if "rcu" in s:
        r = s["rcu"]
        out.append(f"\nrcu: {r['grace_periods']} grace periods for {r['sync_calls']} "
                   f"synchronize_rcu() calls, {r['barriers']} rcu_barrier(), "
                   f"{r['callbacks_invoked']}/{r['callbacks_queued']} callbacks run\n")
    rq = s.get("run_queue")
    if rq is not None:
        out.append(f"\nrun queue: {rq['nr_cpus']} CPUs, {rq['switches']} CPUs taken, "
                   f"{rq['waits']} after a wait ({rq['wait_s']:.1f} s in all), "
                   f"{rq['preempts']} woken lock holders ran over the CPUs, "
                   f"{rq['overruns']} ran without one after the timeout\n")
    fsl = s.get("failslab")
    if fsl is not None and fsl["probability"]:
        sites = ", ".join(f"{n} at {site}" for site, n in sorted(fsl["injected"].items()))
        out.append(f"\nfailslab: probability {fsl['probability']:g}, "
                   f"{sites or 'no failure'} injected\n")
    lc = s.get("leak_check")
    if lc is not None:
        out.append(f"\nleak check: {lc['leaks']} leak(s) in {lc['seconds']:.2f} s\n"
                   if lc["ran"] else f"\nleak check: not run ({lc['why']})\n")
    fs = s["findings"]
    out.append(f"\nfindings: {len(fs)}\n")
    for f in fs:
        out.append(f"  [{f['kind']}] x{f['count']} first at {f['first_seen_s']:.3f}s: "
                   f"{f['title']}\n      signature: {f['signature']}\n")
    out.append(f"\nexit code {s['exit_code']}\n")
    return "".join(out)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_report_dir(d: str, k: Kernel, s: dict[str, Any], extra: dict[str, str] | None = None
                     ) -> None:
    """Write (or rewrite) every report file; each file is replaced atomically."""
    os.makedirs(d, exist_ok=True)
    _write(os.path.join(d, "summary.json"), json.dumps(s, indent=2) + "\n")
    _write(os.path.join(d, "findings.txt"),
           "".join(f"{f.text}\n(seen {f.count} times, first at {f.time:.3f}s, "
                   f"signature {f.signature})\n\n" for f in k.findings.snapshot())
           or "no findings\n")
    _write(os.path.join(d, "lock_stat.txt"), k.proc_lock_stat())
    _write(os.path.join(d, "lock_stat.json"), json.dumps(lock_stat_json(k), indent=1) + "\n")
    _write(os.path.join(d, "lockdep.txt"), k.proc_lockdep() + "\n" + k.proc_lockdep_stats())
    graph = k.lockdep_graph()
    _write(os.path.join(d, "lockdep_graph.json"), json.dumps(graph, indent=1) + "\n")
    _write(os.path.join(d, "lockdep_graph.dot"), k.lockdep_dot())
    for name, text in (extra or {}).items():
        _write(os.path.join(d, name), text)
