"""Stress benchmark: prints figures, asserts nothing. Each figure runs ``python -m stress`` in a
subprocess with ``--json``.

    python benchmarks/bench_stress.py [--quick] [--only throughput,scaling,rss,detect,presets]

Figures (issue 6 targets in brackets):
  * throughput with every checker on vs off (lockdep, KASAN)              [>= 0.5]
  * throughput with 64 threads vs 8                                       [>= 0.8]
  * RSS growth between 10 s and 60 s of a 64-thread run                   [<= 10 %]
  * time to detect each catalog bug with default flags, median of 5 seeds [<= 5 s, all <= 60 s]
    and how --perturb off / heavy change it
  * each preset: the finding kinds it shows, and any outside the detectors of its bugs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kmemcg.catalog import CATALOG  # noqa: E402


def stress(*args: str, timeout: float = 200) -> dict:
    r = subprocess.run([sys.executable, "-m", "stress", "--json", "--quiet", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode not in (0, 1, 3):
        raise RuntimeError(f"stress {' '.join(args)} exited {r.returncode}: {r.stderr[-400:]}")
    return json.loads(r.stdout)


def throughput(dur: float) -> None:
    on = stress("--threads", "64", "--duration", str(dur), "--seed", "1")
    off = stress("--threads", "64", "--duration", str(dur), "--seed", "1", "--no-lockdep",
                 "--no-kasan")
    print(f"throughput, 64 threads, {dur:.0f} s: checkers on {on['ops_per_s']:.0f} ops/s, "
          f"off {off['ops_per_s']:.0f} ops/s -> ratio {on['ops_per_s'] / off['ops_per_s']:.2f}"
          " [target >= 0.5]")


def scaling(dur: float) -> None:
    """64 vs 8 threads with default flags, then with --perturb off: with the window sleeps on,
    the 8-thread run's lone root churner and RCU writer are bound by their sleeps, not by
    the GIL, so its mix shifts to cheap ops (more ops per second for less work); without
    them both runs are GIL-bound on the same mix. The per-kind rates show the shift. Last
    with --no-run-queue: every driver runnable at once (with the default run queue at most
    --cpus (4) drivers run at a time, the rest wait off the GIL)."""
    for extra in ((), ("--perturb", "off"), ("--no-run-queue",)):
        r64 = stress("--threads", "64", "--duration", str(dur), "--seed", "2", *extra)
        r8 = stress("--threads", "8", "--duration", str(dur), "--seed", "2", *extra)
        flags = " ".join(extra) or "default flags"
        print(f"scaling, {dur:.0f} s, {flags}: 64 threads {r64['ops_per_s']:.0f} ops/s, "
              f"8 threads {r8['ops_per_s']:.0f} ops/s -> ratio "
              f"{r64['ops_per_s'] / r8['ops_per_s']:.2f} [target >= 0.8]")
        for kind in ("alloc", "rcu_lookup", "cache_create", "rcu_barrier", "memcg_offline"):
            a, b = (r["ops"].get(kind, 0) / r["duration_s"] for r in (r64, r8))
            print(f"    {kind:14s} 64 threads {a:8.0f}/s   8 threads {b:8.0f}/s")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss(total: float) -> None:
    p = subprocess.Popen([sys.executable, "-m", "stress", "--threads", "64", "--duration",
                          str(total), "--quiet", "--seed", "3"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    samples = {}
    try:
        for at in (10.0, total - 2):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            samples[at] = _rss_kib(p.pid)
    finally:
        p.wait(timeout=total + 60)
    a, b = samples[10.0], samples[total - 2]
    print(f"RSS at 10 s {a / 1024:.1f} MiB, at {total - 2:.0f} s {b / 1024:.1f} MiB -> growth "
          f"{(b - a) / a * 100:+.1f} % [target <= 10 %]")


def detect(seeds: int, limit: float, perturbs: list[str], only: list[str],
           flags: list[str]) -> None:
    print(f"\ntime to detect each catalog bug (switched on alone on the fixed preset), "
          f"{seeds} seeds, --fail-fast, limit {limit:.0f} s{', ' if flags else ''}"
          f"{' '.join(flags)}:")
    print(f"{'bug':<44}{'perturb':<9}{'median':>8}{'max':>8}  found  kinds")
    for bug in CATALOG:
        if only and bug.name not in only:
            continue
        # a leak bug (17) is found by kmemleak's scan thread during the run, like the rest
        dur = limit
        for perturb in perturbs:
            times, kinds, found, missed = [], set(), 0, []
            for seed in range(100, 100 + seeds):
                out = stress("--threads", "64", "--duration", str(dur), "--fail-fast",
                             "--seed", str(seed), "--bug", bug.name,
                             "--perturb", perturb, *flags, timeout=limit + 120)
                fs = out["findings"]
                kinds |= {f["kind"] for f in fs}
                # found: a finding of the bug's own detectors; a run that --fail-fast stopped
                # at another kind (a hung task, say) is a miss, and that kind is starred
                ours = [f for f in fs if f["kind"] in bug.detector]
                if ours:
                    found += 1
                    times.append(min(f["first_seen_s"] for f in ours))
                else:
                    times.append(float("inf"))
                    first = min(fs, key=lambda f: f["first_seen_s"])["kind"] if fs else "none"
                    missed.append(f"{seed}:{first}")
            med = statistics.median(times)
            shown = sorted(k if k in bug.detector else f"*{k}" for k in kinds)
            print(f"{bug.name:<44}{perturb:<9}{med:>8.2f}{max(times):>8.2f}  {found}/{seeds}"
                  f"  {', '.join(shown)}{'  missed ' + ' '.join(missed) if missed else ''}")


def presets(seeds: int, dur: float, flags: list[str]) -> None:
    """Each preset, default flags (plus ``flags``): the finding kinds it shows against the
    detectors of the bugs it documents (a kind outside them would be a bug the preset does not
    document)."""
    from kmemcg.config import PRESETS
    print(f"\npresets, 64 threads, {seeds} seeds x {dur:.0f} s (no --fail-fast)"
          f"{', ' if flags else ''}{' '.join(flags)}:")
    print(f"{'preset':<16}{'bugs':<6}{'first finding':>14}  kinds seen / outside the documented")
    for name, p in PRESETS.items():
        expected = {d for b in CATALOG if b.name in p.bugs for d in b.detector}
        seen, firsts = set(), []
        for seed in range(seeds):
            out = stress("--threads", "64", "--duration", str(dur), "--kernel", name,
                         "--seed", str(200 + seed), *flags, timeout=dur + 120)
            fs = out["findings"]
            seen |= {f["kind"] for f in fs}
            firsts.append(min((f["first_seen_s"] for f in fs), default=float("inf")))
        extra = seen - expected
        print(f"{name:<16}{len(p.bugs):<6}{statistics.median(firsts):>13.2f}s  "
              f"{', '.join(sorted(seen)) or '-'} / {', '.join(sorted(extra)) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, 3 seeds")
    ap.add_argument("--only", default="throughput,scaling,rss,detect,presets")
    ap.add_argument("--bugs", default="", help="comma-separated catalog bug names (detect)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per bug (detect)")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds per run (detect)")
    ap.add_argument("--perturb", default=None, help="comma-separated --perturb levels (detect)")
    ap.add_argument("--flags", default="",
                    help="more stress flags for detect and presets, e.g. --run-queue")
    a = ap.parse_args()
    parts = set(a.only.split(","))
    dur = 5.0 if a.quick else 10.0
    t = time.monotonic()
    if "throughput" in parts:
        throughput(dur)
    if "scaling" in parts:
        scaling(dur)
    if "rss" in parts:
        rss(30.0 if a.quick else 60.0)
    if "detect" in parts:
        levels = a.perturb.split(",") if a.perturb else (
            ["light"] if a.quick else ["light", "off", "heavy"])
        detect(a.seeds or (3 if a.quick else 5), a.limit, levels,
               [b for b in a.bugs.split(",") if b], a.flags.split())
    if "presets" in parts:
        presets(2 if a.quick else 3, 15.0 if a.quick else 30.0, a.flags.split())
    print(f"\n(total {time.monotonic() - t:.0f} s)")


if __name__ == "__main__":
    main()
