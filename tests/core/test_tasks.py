"""Tasks: ``current`` per thread and per kernel, pids, kthreads, exit-time checks."""

from __future__ import annotations

import threading

from kmemcg import Kernel, KernelTornDown, Task
from kmemcg.core import findings as F


def _in_thread(fn, *args):
    """Run ``fn`` on a plain thread and return its result (bounded)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), name="helper")
    t.start()
    t.join(10)
    assert not t.is_alive()
    return out[0]


def test_current_is_stable_per_thread_and_distinct_across_threads(kernel) -> None:
    me = kernel.current()
    assert isinstance(me, Task)
    assert kernel.current() is me
    assert me.comm == threading.current_thread().name
    assert me.name == f"{me.comm}/{me.pid}"
    assert me.kernel is kernel
    other = _in_thread(kernel.current)
    assert other is not me
    assert other.comm == "helper"
    assert other.pid != me.pid


def test_pids_increment(kernel) -> None:
    first = kernel.current().pid
    pids = [_in_thread(lambda: kernel.current().pid) for _ in range(3)]
    # strictly increasing (the kernel's own kthreads may take pids in between)
    assert first < pids[0] < pids[1] < pids[2]


def test_two_kernels_give_one_thread_two_tasks() -> None:
    with Kernel(name="a") as ka, Kernel(name="b") as kb:
        ta, tb = ka.current(), kb.current()
        assert ta is not tb
        assert ta.kernel is ka and tb.kernel is kb
        # per-task state is not shared between kernels
        m = ka.mutex("only_in_a")
        with m:
            assert len(ta.held) == 1
            assert tb.held == []
        assert ka.current() is ta and kb.current() is tb


def test_task_registry_lists_live_tasks(kernel) -> None:
    me = kernel.current()
    assert me in kernel.tasks.all()
    t = kernel.kthread_run(lambda: kernel.current(), name="shortlived")
    t.join(10)
    assert not t.is_alive()
    assert t.result is t.task
    assert t.task.exited
    assert t.task not in kernel.tasks.all()


def test_kthread_result_and_name(kernel) -> None:
    t = kernel.kthread_run(lambda a, b: (kernel.current().comm, a + b), 2, 3, name="adder")
    t.join(10)
    assert t.result == ("adder", 5)
    assert t.exception is None
    assert t.daemon


def boom_in_kthread() -> None:
    raise ValueError("boom from a kthread")


def test_kthread_exception_is_a_finding_and_kernel_keeps_working(kernel) -> None:
    t = kernel.kthread_run(boom_in_kthread, name="oopser")
    t.join(10)
    assert not t.is_alive()
    assert isinstance(t.exception, ValueError)
    [f] = kernel.findings.of_kind(F.KTHREAD_EXCEPTION)
    assert f.thread == t.task.name
    assert "oopser" in f.title and "ValueError" in f.title
    assert "Traceback" in f.text
    assert "ValueError: boom from a kthread" in f.text
    assert "boom_in_kthread" in f.text  # the raising function is in the traceback
    # the kernel still works: locks, more kthreads
    m = kernel.mutex("after_oops")
    with m:
        assert m.is_held()
    t2 = kernel.kthread_run(lambda: 42, name="fine")
    t2.join(10)
    assert t2.result == 42
    assert len(kernel.findings.of_kind(F.KTHREAD_EXCEPTION)) == 1


def test_kthread_on_exception_hook_replaces_the_finding(kernel) -> None:
    seen = []
    t = kernel.kthread_run(boom_in_kthread, name="hooked",
                           on_exception=lambda task, e: seen.append((task.comm, type(e))))
    t.join(10)
    assert seen == [("hooked", ValueError)]
    assert kernel.findings.of_kind(F.KTHREAD_EXCEPTION) == []


def test_lock_held_at_kthread_exit(kernel) -> None:
    m = kernel.mutex("leaked_mutex")

    def leak() -> None:
        m.lock()

    t = kernel.kthread_run(leak, name="leaker")
    t.join(10)
    [f] = kernel.findings.of_kind(F.LOCK_HELD_AT_EXIT)
    assert f.thread == t.task.name
    assert "leaked_mutex" in f.text
    assert "leaker" in f.text


def test_clean_kthread_exit_has_no_findings(kernel) -> None:
    m = kernel.mutex("balanced")

    def ok() -> None:
        with m:
            pass

    t = kernel.kthread_run(ok, name="clean")
    t.join(10)
    assert len(kernel.findings) == 0


def test_lock_held_at_foreign_thread_exit(kernel) -> None:
    """A plain thread (not a kthread) is checked when its thread-local storage goes."""
    m = kernel.mutex("foreign_leak")
    t = threading.Thread(target=m.lock, name="foreign")
    t.start()
    t.join(10)
    assert [f.kind for f in kernel.findings] == [F.LOCK_HELD_AT_EXIT]


def test_exit_checks_run_at_kthread_exit(kernel) -> None:
    seen = []
    kernel.add_exit_check(lambda task: seen.append(task.comm))
    t = kernel.kthread_run(lambda: None, name="checked")
    t.join(10)
    assert "checked" in seen


def test_check_alive_and_kthread_run_after_shutdown() -> None:
    k = Kernel(name="dead")
    k.check_alive()
    assert k.shutdown() == []
    assert k.is_dead()
    try:
        k.check_alive()
    except KernelTornDown:
        pass
    else:
        raise AssertionError("check_alive did not raise on a dead kernel")
    try:
        k.kthread_run(lambda: None)
    except KernelTornDown:
        pass
    else:
        raise AssertionError("kthread_run started a thread on a dead kernel")
    assert k.shutdown() == []  # idempotent


def test_on_shutdown_hooks_run_in_reverse_order() -> None:
    k = Kernel(name="hooks")
    order = []
    k.on_shutdown(lambda: order.append(1))
    k.on_shutdown(lambda: order.append(2))
    k.shutdown()
    assert order == [2, 1]


def test_python_stack_of_a_running_task(kernel) -> None:
    inside = threading.Event()
    leave = threading.Event()

    def parked_here() -> None:
        inside.set()
        leave.wait(10)

    t = kernel.kthread_run(parked_here, name="stacked")
    assert inside.wait(5)
    try:
        assert "parked_here" in t.task.python_stack()
    finally:
        leave.set()
    t.join(10)
    assert "not running" in t.task.python_stack()
