"""``python -m stress``: hammer a kernel model with many threads and report what was found.

Exit codes: 0 no findings; 1 findings; 2 bad usage; 3 a real deadlock or hung task;
4 internal crash (report still written); 130 interrupted (partial report written).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import traceback
from collections import Counter

from kmemcg import Instrument, Kernel
from kmemcg.core import findings as F
from stress import reporting
from stress.workloads import WORKLOADS, LockWorld, pick

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_DEADLOCK, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

PERTURB = {  # probability of a delay at a race window, and its longest sleep (s)
    "off": (0.0, 0.0),
    "light": (0.05, 0.0005),
    "heavy": (0.3, 0.002),
}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m stress",
                description="Hammer the kmemcg kernel model with threads; report findings.")
    p.add_argument("--threads", type=int, default=64, help="driver threads (default 64)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes every random choice of the drivers (default: random, printed)")
    p.add_argument("--workload", default="locks", help="what the drivers do (--list-workloads)")
    p.add_argument("--perturb", choices=sorted(PERTURB), default="light",
                   help="delays at named race windows (default light)")
    p.add_argument("--hung-timeout", type=float, default=10.0,
                   help="seconds a task may block before it is reported hung (default 10)")
    p.add_argument("--no-lockdep", action="store_true", help="run without the lock validator")
    p.add_argument("--lock-stat", action="store_true",
                   help="count acquisitions and hold times (CONFIG_LOCK_STAT; slower)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first finding")
    p.add_argument("--report", metavar="DIR", help="write the full report into DIR")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--log-level", default="WARNING",
                   choices=["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"],
                   help="loguru level for the run's log on stderr (default WARNING)")
    p.add_argument("--list-workloads", action="store_true", help="list workloads and exit")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if not args.duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.hung_timeout <= 0:
        raise UsageError(f"--hung-timeout must be positive, got {args.hung_timeout}")
    if args.workload not in WORKLOADS:
        raise UsageError(f"unknown --workload {args.workload!r} "
                         f"(choose from {', '.join(WORKLOADS)})")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    return args


class Perturb(Instrument):
    """Widen race windows: at each named window, sleep a little with some probability. The
    random stream is per task and derived from the run's seed."""

    def __init__(self, seed: int, prob: float, longest: float) -> None:
        self.seed, self.prob, self.longest = seed, prob, longest

    def on_event(self, point: str, label: str, task, obj) -> None:
        if point != "window":
            return
        rng = task.extra.get("perturb_rng")
        if rng is None:
            rng = task.extra["perturb_rng"] = random.Random(self.seed * 7919 + task.pid)
        if rng.random() < self.prob:
            time.sleep(rng.random() * self.longest)


def run(args: argparse.Namespace) -> int:
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"stress: seed {seed} (replay the same driver choices with --seed {seed})",
          file=sys.stderr)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # open the GIL's race windows: switch often under stress
    k = Kernel(name="stress", lockdep=not args.no_lockdep, lock_stat=args.lock_stat)
    prob, longest = PERTURB[args.perturb]
    if prob:
        k.add_instrument(Perturb(seed, prob, longest))
    world = LockWorld.build(k)
    stop = threading.Event()
    counters = [Counter() for _ in range(args.threads)]  # one per driver: no shared counter
    first_finding = threading.Event()
    k.findings.add_listener(lambda f: first_finding.set())

    def driver(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        c = counters[i]
        while not stop.is_set():
            pick(args.workload, rng)(world, rng, c)

    show = not args.quiet and sys.stderr.isatty()
    t0 = time.monotonic()
    code = EXIT_OK
    crash = None
    try:
        for i in range(args.threads):
            k.kthread_run(driver, i, name=f"stress{i}")
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= args.duration or k.deadlocked:
                break
            if args.fail_fast and first_finding.is_set():
                break
            time.sleep(min(0.25, args.duration - elapsed))
            if show:
                n = sum(sum(c.values()) for c in counters)
                sys.stderr.write(f"\r  {elapsed:6.1f}s / {args.duration:.0f}s  "
                                 f"{n / max(elapsed, 1e-9):9.0f} ops/s  "
                                 f"findings {len(k.findings)}   ")
                sys.stderr.flush()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception:  # internal crash: still flush the report
        crash = traceback.format_exc()
        code = EXIT_CRASH
    finally:
        stop.set()
        elapsed = time.monotonic() - t0
        stuck = k.shutdown(timeout=min(2.0, args.hung_timeout))
        sys.setswitchinterval(old_switch)
        if show:
            sys.stderr.write("\n")
    ops: Counter = Counter()
    for c in counters:
        ops.update(c)
    if code == EXIT_OK:
        if k.deadlocked or k.findings.of_kind(F.REAL_DEADLOCK, F.HUNG_TASK):
            code = EXIT_DEADLOCK
        elif len(k.findings):
            code = EXIT_FINDINGS
    s = reporting.summary(k, seed=seed, kernel="locks-only", bugs=[], threads=args.threads,
                          duration_s=elapsed, ops=ops, exit_code=code, workload=args.workload)
    if stuck:
        s["stuck_threads"] = stuck
    if args.report:
        reporting.write_report_dir(args.report, k, s, {"crash.txt": crash} if crash else None)
    if args.json:
        print(json.dumps(s))
    else:
        print(reporting.human_summary(s), end="")
    if crash:
        print(f"stress: internal error: {crash.strip().splitlines()[-1]}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"stress: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.list_workloads:
        for name, ops in WORKLOADS.items():
            print(f"{name:<16}{', '.join(op.__name__ for op, _ in ops)}")
        return EXIT_OK
    try:
        return run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
