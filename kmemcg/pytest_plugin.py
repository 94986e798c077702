"""pytest plugin (entry point ``pytest11: kmemcg``): kernels for users' scenarios, checked the
way a kernel CI bot checks a boot.

Models the kernel's test harnesses at the edge of the console: a KUnit/kselftest run fails when
the boot log carries a splat nobody expected (here: any finding of a test's kernel it did not
declare), and a hung test gets SysRq-d's "Showing all locks held in the system"
(debug_show_all_locks(), :func:`kmemcg.core.report.all_held_locks`) beside the Python stacks.

Fixtures: ``kernel`` (a fresh Kernel; ``@pytest.mark.kmemcg_kernel(config=, bugs=, **kw)`` or
indirect parametrization picks it), ``kernel_expect(kind, ..., optional=False)``,
``kernel_breakpoints`` (armed breakpoints released at teardown), ``kmemcg_kernel_factory``
(more kernels, same checks).
Markers: ``kmemcg_kernel``, ``kmemcg_expect``, ``soak`` (deselected unless ``-m`` names it),
``slow``. A conftest ``kernel`` fixture overrides the plugin's (the project's own tests do).

Soak campaigns (stress runs under xdist, merged reports) are the ``stress`` package's plugin,
:mod:`stress.pytest_soak` (entry point ``kmemcg-soak``): the model never imports its drivers.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kmemcg.core import findings as F
from kmemcg.core.report import all_held_locks
from kmemcg.kernel import Kernel

# every finding kind the checkers report (the constants of kmemcg.core.findings)
KINDS = frozenset(v for n, v in vars(F).items() if n.isupper() and isinstance(v, str))
MARKERS = (
    "kmemcg_kernel(config='fixed', bugs=(), **kernel_kwargs): how the kernel fixture boots",
    "kmemcg_expect(*kinds, optional=False): finding kinds the test's kernels may (optional) "
    "or must report",
    "soak: long stress campaigns (opt-in: -m soak)",
    "slow: tests that take more than a few seconds",
)


class _Scope:
    """One test's kernels and expectations, torn down and checked together."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.kernels: list[Kernel] = []
        self.expected: list[tuple[str, bool, str]] = []  # (kind, optional, declared by)

    def expect(self, kinds: tuple[str, ...], optional: bool, by: str) -> None:
        for kind in kinds:
            if kind not in KINDS:
                raise pytest.UsageError(f"{by}: unknown finding kind {kind!r} (known: "
                                        f"{', '.join(sorted(KINDS))})")
            self.expected.append((kind, optional, by))


_SCOPE = pytest.StashKey[_Scope]()
_CALL_FAILED = pytest.StashKey[bool]()
_DUMP_TIMER = pytest.StashKey[threading.Timer]()
_KERNELS = pytest.StashKey[list]()


def _scope(item: pytest.Item) -> _Scope:
    s = item.stash.get(_SCOPE, None)
    if s is None:
        s = item.stash[_SCOPE] = _Scope(item)
    return s


def register_kernel(item: pytest.Item, k: Kernel) -> None:
    """Let the timeout dump show ``k``'s held locks (the plugin's fixtures do it; a conftest
    fixture of its own can call it too). Registering does not add the findings check."""
    regs = item.stash.setdefault(_KERNELS, [])
    if k not in regs:
        regs.append(k)



# ----------------------------------------------------------------------------- configuration
def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kmemcg", "kmemcg kernel model")
    g.addoption("--kmemcg-shutdown-timeout", type=float, default=5.0, metavar="S",
                help="seconds a test's kernel may take to stop its threads (default 5)")


def pytest_configure(config: pytest.Config) -> None:
    for m in MARKERS:
        config.addinivalue_line("markers", m)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``soak`` is opt-in: deselected unless the -m expression names it."""
    if re.search(r"\bsoak\b", config.option.markexpr or ""):
        return
    keep, drop = [], []
    for it in items:
        (drop if it.get_closest_marker("soak") else keep).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture
def _kmemcg_scope(request: pytest.FixtureRequest) -> Iterator[_Scope]:
    s = _scope(request.node)
    for m in request.node.iter_markers("kmemcg_expect"):
        s.expect(tuple(m.args), bool(m.kwargs.get("optional", False)),
                 f"@pytest.mark.kmemcg_expect({', '.join(map(repr, m.args))})")
    yield s
    _check(request.node, s, request.config.getoption("kmemcg_shutdown_timeout"))


def _check(item: pytest.Item, s: _Scope, timeout: float) -> None:
    problems: list[str] = []
    for k in s.kernels:
        stuck = k.shutdown(timeout)
        if stuck:
            problems.append(f"kernel {k.name!r}: {len(stuck)} model thread(s) still alive "
                            f"{timeout:g}s after shutdown: {', '.join(stuck)}\n")
    declared = {kind for kind, _, _ in s.expected}
    seen: set[str] = set()
    for k in s.kernels:
        for f in k.findings.snapshot():
            seen.add(f.kind)
            if f.kind not in declared:
                problems.append(
                    f"kernel {k.name!r}: undeclared finding [{f.kind}] (declare it with "
                    f"@pytest.mark.kmemcg_expect({f.kind!r}) or kernel_expect({f.kind!r})):\n"
                    f"{f.text}\n(seen {f.count} times, first at {f.time:.3f}s, "
                    f"signature {f.signature})\n")
    if not item.stash.get(_CALL_FAILED, False):  # a failed test proves no absence
        for kind, optional, by in s.expected:
            if not optional and kind not in seen and s.kernels:
                problems.append(f"expected finding [{kind}] (declared by {by}) was not "
                                "reported by any kernel of this test; declare it with "
                                "optional=True if it may not happen\n")
    if problems:
        pytest.fail("kmemcg: " + "\nkmemcg: ".join(dict.fromkeys(problems)), pytrace=False)


def _boot(request: pytest.FixtureRequest, s: _Scope, **kw: Any) -> Kernel:
    kw.setdefault("name", request.node.name)
    k = Kernel(**kw)
    s.kernels.append(k)
    register_kernel(request.node, k)
    return k


@pytest.fixture
def kernel(request: pytest.FixtureRequest, _kmemcg_scope: _Scope) -> Kernel:
    """A fresh Kernel: ``@pytest.mark.kmemcg_kernel(config=, bugs=, **kw)``, or indirect
    parametrization with a preset name or a dict of Kernel arguments. Shut down at teardown;
    the test fails on stuck threads and on findings it did not declare."""
    kw: dict[str, Any] = {}
    m = request.node.get_closest_marker("kmemcg_kernel")
    if m is not None:
        if m.args:
            kw["config"] = m.args[0]
        kw.update(m.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, str):
        kw["config"] = param
    elif isinstance(param, dict):
        kw.update(param)
    elif param is not None:
        raise pytest.UsageError(f"kernel: indirect parameter {param!r} is neither a preset "
                                "name nor a dict of Kernel arguments")
    return _boot(request, _kmemcg_scope, **kw)


@pytest.fixture
def kmemcg_kernel_factory(request: pytest.FixtureRequest, _kmemcg_scope: _Scope):
    """``make(**Kernel kwargs)``: more kernels in one test, checked like ``kernel``."""
    return lambda **kw: _boot(request, _kmemcg_scope, **kw)


@pytest.fixture
def kernel_expect(_kmemcg_scope: _Scope):
    """``kernel_expect("circular_locking", ..., optional=False)``: declare finding kinds."""
    def expect(*kinds: str, optional: bool = False) -> None:
        _kmemcg_scope.expect(kinds, optional, f"kernel_expect({', '.join(map(repr, kinds))})")
    return expect


class BreakpointHelper:
    """``add("window:NAME", thread=, count=, max_pause=, kernel=)`` over the test's kernel;
    every breakpoint it armed is released at teardown, before the kernel shuts down."""

    def __init__(self, k: Kernel) -> None:
        self.kernel = k
        self.armed: list[Any] = []

    def add(self, key: str, *, kernel: Kernel | None = None, **kw: Any) -> Any:
        bp = (kernel or self.kernel).breakpoints.add(key, **kw)
        self.armed.append(bp)
        return bp

    def release_all(self) -> None:
        for bp in self.armed:
            bp.release()
        self.armed.clear()


@pytest.fixture
def kernel_breakpoints(kernel: Kernel) -> Iterator[BreakpointHelper]:
    h = BreakpointHelper(kernel)
    yield h
    h.release_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if rep.when == "call" and rep.failed:
        item.stash[_CALL_FAILED] = True
    return rep


# ----------------------------------------------------------------------------- timeout dump
def model_state(item: pytest.Item) -> str:
    """Held locks and blocked tasks of every kernel registered for ``item``."""
    out = []
    for k in list(item.stash.get(_KERNELS, [])):
        out.append(f"\n---- kmemcg: kernel {k.name!r} at timeout ----")
        try:
            out.append(all_held_locks(k))
            now = time.monotonic()
            for t in k.tasks.all():
                if t.blocked_on is not None:
                    what = getattr(t.blocked_on, "name", None) or type(t.blocked_on).__name__
                    out.append(f"{t.name} blocked on {what} for {now - t.blocked_since:.1f}s\n")
        except Exception as e:  # a dump must never hide the timeout itself
            out.append(f"(model state unavailable: {e!r})\n")
    return "".join(out)


def _dump(item: pytest.Item) -> None:
    text = model_state(item)
    if text:
        # sys.stderr is the test's capture: pytest-timeout prints it as "Captured stderr"
        sys.stderr.write(text)
        sys.stderr.flush()


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Method thread: run pytest-timeout's own timer, dumping the model's held locks first.
    Method signal: a thread dumps them just before the alarm (the handler cannot be wrapped)."""
    import pytest_timeout
    if settings.method == "thread" and hasattr(pytest_timeout, "timeout_timer"):
        def fired() -> None:
            try:
                _dump(item)
            finally:
                pytest_timeout.timeout_timer(item, settings)
        timer = threading.Timer(settings.timeout, fired)
        timer.name = f"kmemcg-timeout {item.nodeid}"
        timer.daemon = True

        def cancel() -> None:
            timer.cancel()
            timer.join()
        item.cancel_timeout = cancel
        timer.start()
        return True
    t = threading.Timer(max(settings.timeout - 0.25, settings.timeout * 0.9), _dump, (item,))
    t.daemon = True
    item.stash[_DUMP_TIMER] = t
    t.start()
    return None


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    t = item.stash.get(_DUMP_TIMER, None)
    if t is not None:
        t.cancel()
