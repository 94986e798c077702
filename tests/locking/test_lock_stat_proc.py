"""lock_stat (/proc/lock_stat) and lockdep's introspection files and graph exports."""

from __future__ import annotations

import gc
import json
import re
import threading
import time

from kmemcg import Kernel
from kmemcg.locking import lock_stat
from kmemcg.testing import wait_until

COLUMNS = ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
           "waittime-avg", "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max",
           "holdtime-total", "holdtime-avg")


def rows(text: str) -> dict[str, dict[str, float]]:
    """Parse the class rows of /proc/lock_stat: name -> {column: value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(\S+):\s+(\S+(?:\s+\S+){11})\s*$", line)
        if m:
            vals = [float(v) for v in m.group(2).split()]
            out[m.group(1)] = dict(zip(COLUMNS, vals))
    return out


def class_order(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\s*(\S+):\s+\d", text, re.M)]


def contend_once(k: Kernel, m) -> None:
    """One contended acquisition of ``m`` by a kthread while this thread holds it."""
    m.lock()
    t = k.kthread_run(lambda: (m.lock(), m.unlock()), name="contender")
    assert wait_until(lambda: t.task is not None and t.task.blocked_on is m)
    m.unlock()
    t.join(5)
    assert not t.is_alive()


# ----------------------------------------------------------------------------- lock_stat

def test_proc_lock_stat_after_contention() -> None:
    with Kernel(name="ls", lock_stat=True) as k:
        busy, idle = k.mutex("busy_lock"), k.mutex("idle_lock")
        contend_once(k, busy)
        for _ in range(5):
            with idle:
                pass
        text = k.proc_lock_stat()
    lines = text.splitlines()
    assert lines[0] == "lock_stat version 0.4"
    header = next(line for line in lines if "class name" in line)
    assert header.split()[2:] == list(COLUMNS)
    r = rows(text)
    # the kernel's own locks (cpu_add_remove_lock at boot) have rows too, never contended here
    assert {"busy_lock", "idle_lock"} <= set(r)
    assert all(v["contentions"] == 0 for name, v in r.items() if name != "busy_lock")
    assert r["busy_lock"]["contentions"] == 1
    assert r["busy_lock"]["acquisitions"] == 2
    assert r["busy_lock"]["waittime-total"] >= r["busy_lock"]["waittime-max"] > 0
    assert r["idle_lock"]["contentions"] == 0
    assert r["idle_lock"]["acquisitions"] == 5
    # sorted by contentions, although idle_lock was taken more often
    order = class_order(text)
    assert order[0] == "busy_lock" and order.index("idle_lock") > 0
    # where the waiter waited, and where the holder had taken it
    points = [line for line in lines if "[contention point]" in line]
    contending = [line for line in lines if "[contending from]" in line]
    assert len(points) == 1 and "busy_lock" in points[0] and "<lambda>" in points[0]
    assert len(contending) == 1 and "contend_once" in contending[0]
    assert "test_lock_stat_proc.py" in contending[0]


def test_acquisition_counts_single_thread() -> None:
    with Kernel(name="ls", lock_stat=True) as k:
        m = k.mutex("counted")
        s = k.rwsem("counted_sem")
        for _ in range(7):
            m.lock()
            m.unlock()
        assert m.trylock()
        m.unlock()
        with s.read():
            pass
        with s.write():
            pass
        assert s.down_write_trylock()
        s.up_write()
        r = rows(k.proc_lock_stat())
    assert r["counted"]["acquisitions"] == 8
    assert r["counted"]["contentions"] == 0
    assert r["counted"]["con-bounces"] == 0 and r["counted"]["acq-bounces"] == 0
    assert r["counted_sem"]["acquisitions"] == 3  # reads and writes in one row


def test_rwsem_trylock_hold_time_is_measured_from_the_trylock() -> None:
    with Kernel(name="ls", lock_stat=True) as k:
        s = k.rwsem("sem")
        t0 = time.perf_counter_ns()
        assert s.down_write_trylock()
        s.up_write()
        assert s.down_read_trylock()
        s.up_read()
        elapsed = time.perf_counter_ns() - t0
        st = lock_stat.class_stat(s.lock_class())
    assert st.acquisitions == 2
    assert st.holds == 2
    # a logical bound, not a speed figure: both holds happened inside [t0, now]
    assert st.hold_total <= elapsed


def test_lock_stat_off_counts_only_contention() -> None:
    with Kernel(name="ls_off") as k:  # lock_stat is opt-in (CONFIG_LOCK_STAT)
        assert not k.lock_stat
        quiet, busy = k.mutex("quiet"), k.mutex("busy")
        with quiet:
            pass
        contend_once(k, busy)
        text = k.proc_lock_stat()
    r = rows(text)
    assert "quiet" not in r  # nothing to show
    assert r["busy"]["contentions"] == 1 and r["busy"]["acquisitions"] == 0
    assert "[contention point]" in text


def _use_and_drop(k: Kernel, n: int) -> None:
    m = k.mutex("short_lived")
    for _ in range(n):
        with m:
            pass


def test_stats_survive_the_lock_instance() -> None:
    with Kernel(name="ls", lock_stat=True) as k:
        _use_and_drop(k, 5)
        gc.collect()
        cls = k.lockdep.find_class("short_lived")
        assert cls is not None and cls._live == []  # the instance is gone...
        assert rows(k.proc_lock_stat())["short_lived"]["acquisitions"] == 5  # ...its figures not
        _use_and_drop(k, 3)
        gc.collect()
        assert rows(k.proc_lock_stat())["short_lived"]["acquisitions"] == 8


class _Cyclic:
    """An object with a lock that only the cyclic garbage collector frees."""

    def __init__(self, k: Kernel) -> None:
        self.lock = k.mutex("cyclic")
        self.me = self
        with self.lock:
            pass


def test_stats_of_a_lock_freed_by_the_cycle_collector() -> None:
    with Kernel(name="ls", lock_stat=True) as k:
        for _ in range(3):
            _Cyclic(k)
        gc.collect()
        assert rows(k.proc_lock_stat())["cyclic"]["acquisitions"] == 3


def test_collector_finalizing_a_lock_while_its_class_stats_are_read() -> None:
    """The collector may run a lock's finalizer in a thread that is reading (and so holds)
    that class's statistics lock: retiring must not wait for it (a self-deadlock)."""
    with Kernel(name="ls", lock_stat=True) as k:
        keep = k.mutex("cyclic")
        cls = keep.lock_class()
        _Cyclic(k)  # garbage in a cycle, not yet collected

        def collect_while_holding() -> None:
            with cls._stat_lock:
                gc.collect()

        t = threading.Thread(target=collect_while_holding, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "retire() deadlocked on the class statistics lock"
        with keep:
            pass
        # the dead instance's figures are folded in at the next read, counted once
        assert rows(k.proc_lock_stat())["cyclic"]["acquisitions"] == 2
        assert rows(k.proc_lock_stat())["cyclic"]["acquisitions"] == 2
        assert len(cls._live) == 1


# ----------------------------------------------------------------------------- /proc/lockdep*

def _abc(k: Kernel) -> None:
    """A -> B -> C nesting (depth 3), then C -> A: a cycle A -> B -> C -> A."""
    a, b, c = k.mutex("A"), k.mutex("B"), k.mutex("C")
    with a, b, c:
        pass
    with c, a:
        pass


def test_proc_lockdep(kernel) -> None:
    a, b, c = kernel.mutex("A"), kernel.mutex("B"), kernel.mutex("C")
    with a, b, c:
        pass
    text = kernel.proc_lockdep()
    assert text.startswith("all lock classes:\n")
    head = re.compile(r"^[0-9a-f]{16} FD:\s*(\d+) BD:\s*(\d+) ([+.]{4}): (\S+)$")
    counts: dict[str, tuple[int, int]] = {}
    deps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines()[1:]:
        m = head.match(line)
        if m:
            current = m.group(4)
            counts[current] = (int(m.group(1)), int(m.group(2)))
            deps[current] = []
        elif line.startswith(" -> "):
            assert re.match(r"^ -> \[[0-9a-f]{16}\] \S+$", line), line
            deps[current].append(line.rsplit(" ", 1)[1])
        else:
            assert line == "", line
    # FD/BD count every class reachable forward/backward; " -> " lists direct dependencies.
    # (The kernel's own subsystems may have registered classes of their own at boot.)
    assert {n: counts[n] for n in "ABC"} == {"A": (2, 0), "B": (1, 1), "C": (0, 2)}
    assert {n: deps[n] for n in "ABC"} == {"A": ["B"], "B": ["C"], "C": []}
    assert set(counts) == {c.display for c in kernel.lockdep.classes}


def _stats(k: Kernel) -> dict[str, str]:
    stats = {}
    for line in k.proc_lockdep_stats().splitlines():
        m = re.match(r"^ (\S.*?)\s{2,}(\S.*)$", line)
        assert m, line
        stats[m.group(1)] = m.group(2)
    return stats


def _first_int(stats: dict[str, str], key: str) -> int:
    return int(stats[key].split()[0])


def test_proc_lockdep_stats(kernel) -> None:
    # deltas: the kernel's own subsystems may have taken locks at boot
    before = _stats(kernel)
    _abc(kernel)
    after = _stats(kernel)
    for key in ("lock-classes", "direct dependencies", "dependency chains",
                "max locking depth", "max bfs queue depth", "stack-trace entries",
                "chain-cache misses", "debug_locks"):
        assert key in after, key

    def delta(key: str) -> int:
        return _first_int(after, key) - _first_int(before, key)

    assert delta("lock-classes") == 3
    assert delta("direct dependencies") == 3  # A->B, B->C, C->A
    assert delta("dependency chains") == 5  # A; A,B; A,B,C; C; C,A
    assert _first_int(after, "max locking depth") == max(3, _first_int(before,
                                                                       "max locking depth"))
    assert "[limit: 48]" in after["max locking depth"]
    assert after["debug_locks"] == "1"


def test_proc_lockdep_chains(kernel) -> None:
    _abc(kernel)
    text = kernel.proc_lockdep_chains()
    blocks = text.strip().split("\n\n")
    assert all(re.match(r"irq_context: 0\n\[[0-9a-f]{16}\]\n", b) for b in blocks)
    chains = [tuple(line.strip() for line in block.splitlines()[2:]) for block in blocks]
    mine = [c for c in chains if set(c) <= {"A", "B", "C"}]
    assert sorted(mine) == sorted([("A",), ("A", "B"), ("A", "B", "C"), ("C",), ("C", "A")])


def test_proc_lockdep_stats_without_lockdep() -> None:
    with Kernel(name="off", lockdep=False) as k:
        _abc(k)
        assert "debug_locks" in k.proc_lockdep_stats()
        assert k.proc_lockdep_stats().rstrip().endswith("0")
        assert k.proc_lockdep_chains() == ""


# ----------------------------------------------------------------------------- graph exports

def test_lockdep_graph_json(kernel) -> None:
    _abc(kernel)
    g = kernel.lockdep_graph()
    assert g["format"] == "kmemcg-lockdep-graph"
    assert g["version"] == 1
    mine = {"A", "B", "C"}
    classes = {c["name"]: c for c in g["classes"]}
    assert mine <= set(classes)
    assert all(classes[n]["kind"] == "mutex" and classes[n]["subclass"] == 0 for n in mine)
    edges = {(e["from"], e["to"]): e for e in g["edges"] if {e["from"], e["to"]} & mine}
    assert set(edges) == {("A", "B"), ("B", "C"), ("C", "A")}
    assert [k for k, e in edges.items() if e["closes_cycle"]] == [("C", "A")]
    for e in edges.values():
        assert e["thread"] == kernel.current().name
        top = e["stack"][0]
        assert top[0] == "test_lock_stat_proc.py" and top[2] == "_abc"
        assert isinstance(top[1], int)
        assert any(fr[2] == "test_lockdep_graph_json" for fr in e["stack"])
    assert [sorted(c) for c in g["cycles"]] == [["A", "B", "C"]]
    again = json.loads(json.dumps(g))
    assert again == g


def test_lockdep_graph_without_cycles(kernel) -> None:
    a, b = kernel.mutex("A"), kernel.mutex("B")
    with a, b:
        pass
    g = kernel.lockdep_graph()
    assert g["cycles"] == []
    assert [(e["from"], e["to"], e["closes_cycle"]) for e in g["edges"]
            if "A" in (e["from"], e["to"])] == [("A", "B", False)]


def test_lockdep_dot(kernel) -> None:
    _abc(kernel)
    x, y = kernel.mutex("X"), kernel.mutex("Y")
    with x, y:  # an edge outside the cycle
        pass
    dot = kernel.lockdep_dot()
    assert dot.startswith('digraph "test" {')
    assert dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    mine = {"A", "B", "C", "X", "Y"}
    edge_lines = {m.group(1, 2): m.group(3)
                  for m in re.finditer(r'^\s*"(\w+)" -> "(\w+)" \[(.*)\];$', dot, re.M)
                  if {m.group(1), m.group(2)} & mine}
    assert set(edge_lines) == {("A", "B"), ("B", "C"), ("C", "A"), ("X", "Y")}
    for pair in (("A", "B"), ("B", "C"), ("C", "A")):
        assert "color=red" in edge_lines[pair]
        assert re.search(r'label="_abc \[test_lock_stat_proc\.py:\d+\]"', edge_lines[pair])
    assert "color=red" not in edge_lines[("X", "Y")]
    assert 'label="test_lockdep_dot [test_lock_stat_proc.py:' in edge_lines[("X", "Y")]
    nodes = {m.group(1): m.group(2)
             for m in re.finditer(r'^\s*"(\w+)" \[label="\w+"(.*)\];$', dot, re.M)}
    assert mine <= set(nodes)
    assert all("color=red" in nodes[n] for n in "ABC")
    assert "color=red" not in nodes["X"]
