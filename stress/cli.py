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

from kmemcg import Kernel
from kmemcg.catalog import listing as bug_listing
from kmemcg.config import PRESETS, Config, ConfigError
from kmemcg.core import findings as F
from kmemcg.core.failslab import FailSlab
from kmemcg.core.instrument import Perturb
from kmemcg.core.sched import RunQueue
from stress import reporting
from stress.args import Parser, UsageError
from stress.cleanup import cleanup, start_leak_scanner
from stress.world import ROLES, WORKLOADS, World, assign_roles, run_role

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_DEADLOCK, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

CLEANUP_TIMEOUT = 3.0  # seconds for the end-of-run cleanup and leak check
# Delays at the named race windows (kmemcg.core.instrument.Perturb): the probability of a
# delay, its longest sleep (s), the share of long ones (up to 25 ms: a grace period and a
# work fit in), and the share of windows each half-second phase focuses (delayed half of the
# time, up to 50 ms, for the whole phase: a grace period and a work under 64 threads' load);
# a window hit no more than 8 times plus 0.05 % of all window hits so far is rare: it sleeps
# up to 10 ms and every window is focused for 30 ms after it (an array relocation's readers).
PERTURB: dict[str, dict[str, float]] = {
    "off": {},
    "light": {"prob": 0.2, "longest": 0.001, "tail": 0.01, "focus": 0.25, "focus_longest": 0.05,
              "rare": 0.0005, "unlocked_tail": 0.2},
    "heavy": {"prob": 0.5, "longest": 0.004, "tail": 0.03, "focus": 0.4, "focus_longest": 0.05,
              "rare": 0.0005, "unlocked_tail": 0.2},
}

# CONFIG_FAILSLAB's probability under stress. The one site that asks today is v3.13's
# relocation (kmemcg.core.failslab): each failure makes the next activation relocate again.
FAILSLAB = 0.25


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m stress",
                description="Hammer the kmemcg kernel model with threads; report findings.")
    p.add_argument("--threads", type=int, default=64, help="driver threads (default 64)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--seed", type=int, default=None,
                   help="fixes every random choice of the drivers (default: random, printed)")
    p.add_argument("--kernel", default="fixed", metavar="PRESET",
                   help="kernel design to model (default fixed; see --list-presets)")
    p.add_argument("--bug", action="append", default=[], metavar="NAME",
                   help="switch a catalog bug on, on top of the preset (repeatable; --list-bugs)")
    p.add_argument("--memcg", default=None, metavar="DESIGN",
                   help="memcg design, overriding the preset's (e.g. v3.13 with none of its bugs)")
    p.add_argument("--hotplug", default=None, metavar="DESIGN",
                   help="CPU hotplug lock design, overriding the preset's (2012, percpu_rwsem)")
    p.add_argument("--cpus", type=int, default=4, help="simulated CPUs (default 4)")
    p.add_argument("--run-queue", action=argparse.BooleanOptionalAction, default=True,
                   help="run at most --cpus driver threads at a time, as a kernel on --cpus CPUs "
                        "(default on: fewer GIL fights with many threads)")
    p.add_argument("--workload", default="default",
                   help="role mix of the driver threads (default; see --list-workloads)")
    p.add_argument("--mix", default=None, metavar="ROLE=W,...",
                   help="role weights, overriding the workload's (e.g. allocator=3,hotplug=1)")
    p.add_argument("--perturb", choices=sorted(PERTURB), default="light",
                   help="delays at named race windows (default light)")
    p.add_argument("--failslab", type=float, default=FAILSLAB, metavar="P",
                   help="fail that share of the allocations the model gives a failure path "
                        f"(CONFIG_FAILSLAB; default {FAILSLAB:g}; 0: off)")
    p.add_argument("--swarm", type=float, default=0.0, metavar="Q",
                   help="share of roles idle in each 1 s phase (swarm testing; default 0: all run)")
    p.add_argument("--hung-timeout", type=float, default=10.0,
                   help="seconds a task may block before it is reported hung (default 10)")
    p.add_argument("--no-lockdep", action="store_true", help="run without the lock validator")
    p.add_argument("--no-kasan", action="store_true", help="run without KASAN checking")
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
    p.add_argument("--list-presets", action="store_true", help="list kernel presets and exit")
    p.add_argument("--list-bugs", action="store_true", help="list the bug catalog and exit")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if not args.duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration}")
    if not 0 <= args.failslab <= 1:
        raise UsageError(f"--failslab must be between 0 and 1, got {args.failslab}")
    if not 0 <= args.swarm < 1:
        raise UsageError(f"--swarm must be at least 0 and below 1, got {args.swarm}")
    if args.hung_timeout <= 0:
        raise UsageError(f"--hung-timeout must be positive, got {args.hung_timeout}")
    if args.workload not in WORKLOADS:
        raise UsageError(f"unknown --workload {args.workload!r} "
                         f"(choose from {', '.join(WORKLOADS)})")
    if not 1 <= args.cpus <= 64:
        raise UsageError(f"--cpus must be between 1 and 64, got {args.cpus}")
    try:
        args.config = Config.make(args.kernel, args.bug, hotplug=args.hotplug,
                                  memcg=args.memcg)
    except ConfigError as e:
        msg = str(e)
        flag = ("--kernel" if "preset" in msg else "--memcg" if "memcg design" in msg
                else "--hotplug" if "hotplug design" in msg else "--bug")
        raise UsageError(f"{flag}: {e}") from None
    args.mix_weights = dict(WORKLOADS[args.workload])
    if args.mix:
        args.mix_weights = parse_mix(args.mix)
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    return args


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        role, sep, weight = part.partition("=")
        role = role.strip()
        if role not in ROLES or not sep:
            raise UsageError(f"bad --mix entry {part!r} (roles: {', '.join(ROLES)}; "
                             "form role=weight)")
        try:
            mix[role] = float(weight)
        except ValueError:
            raise UsageError(f"bad --mix weight {weight!r} for {role}") from None
        if mix[role] < 0:
            raise UsageError(f"bad --mix weight {weight!r} for {role}")
    if not any(mix.values()):
        raise UsageError("--mix gives every role weight 0")
    return mix


def shutdown(k: Kernel, timeout: float) -> list[str]:
    """k.shutdown() on a helper thread: whatever a teardown meets, the caller goes on to write
    the report within ``timeout`` + 2 s. Returns the threads still alive."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.extend(k.shutdown(timeout=timeout)),
                         name="stress-shutdown", daemon=True)
    t.start()
    t.join(timeout + 2.0)
    if t.is_alive():
        out.append("stress-shutdown (kernel teardown did not finish)")
    return out


def run(args: argparse.Namespace) -> int:
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    k = None
    try:  # set-up: a Ctrl-C here tears down what exists (nothing ran: no report)
        k = Kernel(name="stress", config=args.config, lockdep=not args.no_lockdep,
                   kasan=not args.no_kasan, lock_stat=args.lock_stat, cpus=args.cpus,
                   hung_task_timeout=args.hung_timeout)
        if args.run_queue:
            k.rq = RunQueue(args.cpus)
        k.failslab = FailSlab(seed, args.failslab)
        perturb = Perturb(seed, **PERTURB[args.perturb]) if PERTURB[args.perturb] else None
        if perturb is not None:
            k.add_instrument(perturb)
        world = World(k, seed, args.swarm)
        stop = world.stop
        start_leak_scanner(world)
    except KeyboardInterrupt:
        if k is not None:
            shutdown(k, 1.0)
        raise
    # printed once the run is set up: from here on a Ctrl-C writes a partial report
    print(f"stress: seed {seed} (replay the same driver choices with --seed {seed})",
          file=sys.stderr)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # open the GIL's race windows: switch often under stress
    roles = assign_roles(args.mix_weights, args.threads)
    counters = [Counter() for _ in range(args.threads)]  # one per driver: no shared counter
    first_finding = threading.Event()
    k.findings.add_listener(lambda f: first_finding.set())

    def driver(i: int) -> None:
        run_role(world, roles[i], random.Random(seed * 1_000_003 + i), counters[i])

    show = not args.quiet and sys.stderr.isatty()
    drivers: list[threading.Thread] = []
    leak_check: dict = {"ran": False, "leaks": 0, "why": "not reached", "seconds": 0.0}
    t0 = time.monotonic()
    code = EXIT_OK
    crash = None
    try:
        for i in range(args.threads):
            drivers.append(k.kthread_run(driver, i, name=f"{roles[i]}/{i}"))
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
        if code == EXIT_OK:  # not after Ctrl-C or a crash: write what we have at once
            if perturb is not None:
                k.remove_instrument(perturb)  # the cleanup races nothing: no delays
            try:
                leak_check = cleanup(world, drivers, CLEANUP_TIMEOUT)
            except KeyboardInterrupt:
                code = EXIT_INTERRUPTED
        stuck = shutdown(k, min(2.0, args.hung_timeout))
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
    s = reporting.summary(k, seed=seed, kernel=args.kernel, bugs=sorted(args.config.bugs),
                          threads=args.threads, duration_s=elapsed, ops=ops, exit_code=code,
                          workload=args.workload)
    s["roles"] = dict(Counter(roles))
    s["leak_check"] = leak_check
    if k.rq is not None:
        s["run_queue"] = k.rq.stats()
    s["failslab"] = {"probability": k.failslab.probability,
                     "injected": dict(k.failslab.injected)}
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
    if argv[:1] == ["report"]:  # python -m stress report ...: review what runs left behind
        from stress.report.cli import main as report_main
        return report_main(argv[1:])
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"stress: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.list_workloads:
        for name, mix in WORKLOADS.items():
            print(f"{name:<10}" + ", ".join(f"{r}={w:g}" for r, w in mix.items()))
        return EXIT_OK
    if args.list_presets:
        for p in PRESETS.values():
            print(f"{p.name:<15}{p.release:<34}hotplug {p.hotplug:<13}memcg {p.memcg}"
                  f"\n               bugs: {', '.join(sorted(p.bugs)) or '-'}"
                  f"\n               {p.doc}")
        return EXIT_OK
    if args.list_bugs:
        print(bug_listing(), end="")
        return EXIT_OK
    try:
        return run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
