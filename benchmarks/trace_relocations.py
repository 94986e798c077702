"""Catalog bug 7, relocation by relocation (v3.13): prints figures, asserts nothing.

    python benchmarks/trace_relocations.py [--seeds 6] [--first 100] [--duration 20]
                                           [--flags=--no-run-queue]

Whether a seed found bug 7 (``memcg_create_without_slab_mutex_recheck``) within 60 s was a
coin of about 0.75 until session 13: batches of 10 or 20 seeds of the same code differ by
several seeds, so a change to the drivers or to the perturbation is hard to judge by seeds
found. This counts what the coin is made of. Each run relocates the root caches'
memcg_caches arrays about six times, all in its first seconds (they only grow), and more with
``--failslab`` (on by default since session 13: a failed relocation is walked again by the
next activation); a walk, failed or not, is one chance, won when a creation publishes its
child into an array the walk already copied (*stale*: the child is lost) or over a child the
walk copied into the slot the creation had read empty (*over*). The share of walks won counts
several trials per seed instead of one, but it spreads too: 0.16 and 0.26 in two batches of
12 seeds of the same code (session 12, BENCHMARKS.md). The destroy half of the race (a slot
clear the walk undoes) is not counted here.

Also shown: how many creation works waited on memcg_cache_mutex when the relocation took
slab_mutex. The first fresh creation to check its slot in the walk blocks that mutex on
slab_mutex until the walk ends, so a long queue seldom gets a check in.

The trace wraps three methods of ``MemcgSlabV313`` in a child process and reads two private
fields (the mutex's wait list, the array pointer): a diagnostic, not a detector.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUG = "memcg_create_without_slab_mutex_recheck"


def trace_one(seed: int, duration: float, flags: list[str], out: str) -> int:
    """In the child: run stress with the three methods wrapped; write the trace to ``out``."""
    import stress.cli as cli
    from kmemcg.mm.memcg_v313 import MemcgSlabV313

    t0 = time.monotonic()
    lock = threading.Lock()
    relocs: list[dict[str, Any]] = []
    stale: list[float] = []
    over: list[float] = []
    update_all = MemcgSlabV313.memcg_update_all_caches
    update_one = MemcgSlabV313.memcg_update_cache_size
    publish = MemcgSlabV313._publish

    def memcg_update_all_caches(self: MemcgSlabV313, num: int) -> int:
        with lock:
            relocs.append({"t": time.monotonic() - t0, "num": num, "waiters": None})
        return update_all(self, num)

    def memcg_update_cache_size(self: MemcgSlabV313, s: Any, num: int) -> int:
        with lock:
            r = relocs[-1]
            if r["waiters"] is None:  # the walk's first root: slab_mutex is ours
                r["waiters"] = len(self.memcg_cache_mutex._waiters)
        return update_one(self, s, num)

    def _publish(self: MemcgSlabV313, root: Any, arr: Any, idx: int, c: Any) -> None:
        t = time.monotonic() - t0
        with lock:
            if arr is not root.memcg_params.memcg_caches._p:
                stale.append(t)
            elif arr.entries[idx] is not None:
                over.append(t)
        publish(self, root, arr, idx, c)

    MemcgSlabV313.memcg_update_all_caches = memcg_update_all_caches
    MemcgSlabV313.memcg_update_cache_size = memcg_update_cache_size
    MemcgSlabV313._publish = _publish
    try:
        return cli.main(["--json", "--quiet", "--seed", str(seed), "--duration",
                         str(duration), "--bug", BUG, *flags])
    finally:
        with open(out, "w") as f:
            json.dump({"relocations": relocs, "stale": stale, "over": over}, f)


def won_relocations(tr: dict[str, Any]) -> set[int]:
    """The relocations (indices) a race event came after, before the next one began."""
    starts = [r["t"] for r in tr["relocations"]]
    return {bisect.bisect_right(starts, t) - 1 for t in tr["stale"] + tr["over"]} - {-1}


def run_seed(seed: int, duration: float, flags: list[str]) -> dict[str, Any]:
    from kmemcg.catalog import BY_NAME
    detectors = BY_NAME[BUG].detector
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "trace.json")
        r = subprocess.run([sys.executable, __file__, "--one", str(seed), "--out", out,
                            "--duration", str(duration), f"--flags={' '.join(flags)}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
        if r.returncode not in (0, 1, 3):
            raise RuntimeError(f"seed {seed} exited {r.returncode}: {r.stderr[-400:]}")
        with open(out) as f:
            tr = json.load(f)
    found = [f["first_seen_s"] for f in json.loads(r.stdout)["findings"]
             if f["kind"] in detectors]
    tr["found"] = min(found) if found else None
    return tr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6, help="how many seeds (default 6)")
    ap.add_argument("--first", type=int, default=100, help="the first seed (default 100)")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="seconds per run (default 20: the relocations are over by then)")
    ap.add_argument("--flags", default="", help="more stress flags, e.g. --flags=--no-run-queue")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child: one traced run
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    flags = a.flags.split()
    if a.one is not None:
        sys.exit(trace_one(a.one, a.duration, flags, a.out))
    print(f"bug 7 per relocation, {a.seeds} seeds x {a.duration:g} s"
          f"{', ' + a.flags if a.flags else ''}")
    print(f"{'seed':<6}{'relocations':>12}{'stale':>7}{'over':>6}  {'waiters at each walk':<32}"
          "found")
    n_rel = n_ev = n_won = n_found = 0
    waiters: list[int] = []
    t = time.monotonic()
    for seed in range(a.first, a.first + a.seeds):
        tr = run_seed(seed, a.duration, flags)
        ws = [r["waiters"] for r in tr["relocations"] if r["waiters"] is not None]
        waiters += ws
        n_rel += len(tr["relocations"])
        n_ev += len(tr["stale"]) + len(tr["over"])
        n_won += len(won_relocations(tr))
        n_found += tr["found"] is not None
        found = "-" if tr["found"] is None else f"{tr['found']:.2f} s"
        print(f"{seed:<6}{len(tr['relocations']):>12}{len(tr['stale']):>7}{len(tr['over']):>6}"
              f"  {' '.join(map(str, ws)):<32}{found}")
    med = statistics.median(waiters) if waiters else 0
    print(f"relocations won (a race event before the next one): {n_won}/{n_rel} = "
          f"{n_won / max(n_rel, 1):.2f}; race events {n_ev}; seeds found {n_found}/{a.seeds}; "
          f"median waiters {med:g} ({time.monotonic() - t:.0f} s)")


if __name__ == "__main__":
    main()
