"""Lockdep against a brute-force reference, on random acquisition programs (hypothesis).

A program is 2-4 tasks run one after another (so nothing deadlocks for real), each a sequence
of nested acquisitions over 3-5 mutex classes (two instances per class), trylocks, unlocks in
any order, and a pseudo-lock ``M`` (a lockdep_map) taken with check=1, check=0 or as a trylock.

The reference knows nothing of chain keys, caches or BFS. It replays the program with the
kernel's rules and collects every dependency edge:

* a blocking acquisition of class N first checks whether N is already held (check_deadlock:
  recursive locking, and then no edges); otherwise, walking the held stack from the top, it
  adds prev -> N for each held entry, skipping check=0 entries, and stops after the first
  entry that is not a trylock (check_prevs_add);
* a trylock or a check=0 acquisition adds nothing;
* releasing a lock that is not on top pops it and re-acquires every entry above it, in order,
  with the same rules (reacquire_held_locks).

Then it looks for cycles by DFS. The engine must agree exactly: the same edge set, the same
recursive-locking classes, a circular report exactly when the graph has a cycle, and every
reported cycle a real cycle of the reference graph.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kmemcg import Kernel
from kmemcg.core import findings as F

WAIT_S = 10.0
MAP = "M"
MAX_MAP_NEST = 2

# An op: ("acq", lock, mode) with mode "lock" | "try" | "nocheck" ("nocheck": the map only),
# or ("rel", lock). Locks are "A1", "A2", "B1", ... (two instances per class) and "M".
Op = tuple


@st.composite
def programs(draw) -> tuple[int, list[list[Op]]]:
    n_classes = draw(st.integers(3, 5))
    names = [f"{c}{i}" for c in "ABCDE"[:n_classes] for i in (1, 2)]
    tasks = []
    for _ in range(draw(st.integers(2, 4))):
        ops: list[Op] = []
        held: list[str] = []
        for _ in range(draw(st.integers(0, 10))):
            free = [n for n in names if n not in held]
            # Mostly classes not held yet: a recursive acquisition adds no edge.
            fresh = [n for n in free if _cls(n) not in {_cls(h) for h in held}]
            can_map = held.count(MAP) < MAX_MAP_NEST
            choices = []
            if fresh:
                choices += ["lock", "lock", "lock", "lock", "try"]
            if free:
                choices += ["same"]
            if can_map:
                choices += ["map"]
            if held:
                choices += ["rel", "rel"]
            what = draw(st.sampled_from(choices))
            if what == "rel":
                name = draw(st.sampled_from(held))
                ops.append(("rel", name))
                # The release drops the topmost entry of that lock (matters for M only).
                del held[len(held) - 1 - held[::-1].index(name)]
            elif what == "map":
                ops.append(("acq", MAP, draw(st.sampled_from(["lock", "nocheck", "try"]))))
                held.append(MAP)
            else:
                name = draw(st.sampled_from(free if what == "same" else fresh))
                ops.append(("acq", name, "lock" if what == "same" else what))
                held.append(name)
        for name in draw(st.permutations(held)):  # end each task with nothing held
            ops.append(("rel", name))
            del held[len(held) - 1 - held[::-1].index(name)]
        tasks.append(ops)
    return n_classes, tasks


# ---------------------------------------------------------------------- the reference
def _cls(name: str) -> str:
    return name.rstrip("0123456789")


class Reference:
    """Lockdep's dependency rules, replayed naively."""

    def __init__(self) -> None:
        self.edges: set[tuple[str, str]] = set()
        self.recursive: set[str] = set()

    def run(self, tasks: list[list[Op]]) -> None:
        for ops in tasks:
            held: list[tuple[str, str]] = []  # (lock name, mode)
            for op in ops:
                if op[0] == "acq":
                    self._acquire(held, op[1], op[2])
                else:
                    i = max(j for j, (n, _) in enumerate(held) if n == op[1])
                    above = held[i + 1:]
                    del held[i:]
                    for n, mode in above:
                        self._acquire(held, n, mode)

    def _acquire(self, held: list[tuple[str, str]], name: str, mode: str) -> None:
        held.append((name, mode))
        if mode != "lock":
            return  # trylock and check=0: no dependency to it, no AA check
        cls = _cls(name)
        if any(_cls(n) == cls and m != "nocheck" for n, m in held[:-1]):
            self.recursive.add(cls)
            return
        for n, m in reversed(held[:-1]):
            if m == "nocheck":
                continue
            self.edges.add((_cls(n), cls))
            if m != "try":
                break

    def has_cycle(self) -> bool:
        succ: dict[str, list[str]] = {}
        for a, b in self.edges:
            succ.setdefault(a, []).append(b)
        state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

        def dfs(v: str) -> bool:
            state[v] = 1
            for w in succ.get(v, ()):
                if state.get(w) == 1 or (w not in state and dfs(w)):
                    return True
            state[v] = 2
            return False

        return any(v not in state and dfs(v) for v in list(succ))


# ---------------------------------------------------------------------- the engine
def run_engine(k: Kernel, n_classes: int, tasks: list[list[Op]]) -> None:
    locks = {f"{c}{i}": k.mutex(c) for c in "ABCDE"[:n_classes] for i in (1, 2)}
    pseudo = k.lockdep_map(MAP)

    def body(ops: list[Op]) -> None:
        for op in ops:
            if op[0] == "acq":
                _, name, mode = op
                if name == MAP:
                    pseudo.acquire(trylock=mode == "try", check=mode != "nocheck")
                elif mode == "try":
                    assert locks[name].trylock()
                else:
                    locks[name].lock()
            elif op[1] == MAP:
                pseudo.release()
            else:
                locks[op[1]].unlock()

    for i, ops in enumerate(tasks):
        t = k.kthread_run(body, ops, name=f"prog{i}")
        t.join(WAIT_S)
        assert not t.is_alive()
        assert t.exception is None, t.exception


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_engine_matches_reference(prog: tuple[int, list[list[Op]]]) -> None:
    n_classes, tasks = prog
    ref = Reference()
    ref.run(tasks)
    event(f"cycle={ref.has_cycle()} recursive={bool(ref.recursive)}")
    event(f"ops={min(40, sum(map(len, tasks))) // 10 * 10}+")
    k = Kernel(name="prop")
    try:
        run_engine(k, n_classes, tasks)
        engine_edges = {(e.prev.display, e.next.display) for e in k.lockdep.edges()}
        assert engine_edges == ref.edges
        kinds = {f.kind for f in k.findings}
        assert kinds <= {F.CIRCULAR_LOCKING, F.RECURSIVE_LOCKING}, \
            [f.text for f in k.findings]
        assert {f.signature for f in k.findings.of_kind(F.RECURSIVE_LOCKING)} == ref.recursive
        circular = k.findings.of_kind(F.CIRCULAR_LOCKING)
        assert bool(circular) == ref.has_cycle()
        for f in circular:
            path = f.extra["classes"]  # next -> ... -> prev, closed by prev -> next
            hops = list(zip(path, path[1:])) + [(path[-1], path[0])]
            assert all(h in ref.edges for h in hops), (path, ref.edges)
            assert f.signature == "+".join(sorted(set(path)))
    finally:
        k.shutdown()


def test_reference_rules() -> None:
    """The reference itself, on hand-checked programs (so a wrong reference cannot agree with
    a wrong engine unnoticed)."""
    ref = Reference()
    # A held, trylock B, lock C: A -> C and B -> C, nothing to B.
    ref.run([[("acq", "A1", "lock"), ("acq", "B1", "try"), ("acq", "C1", "lock"),
              ("rel", "C1"), ("rel", "B1"), ("rel", "A1")]])
    assert ref.edges == {("A", "C"), ("B", "C")} and not ref.has_cycle()
    # A, B, C held; B released first: C re-acquired over A gives A -> C.
    ref = Reference()
    ref.run([[("acq", "A1", "lock"), ("acq", "B1", "lock"), ("acq", "C1", "lock"),
              ("rel", "B1"), ("rel", "C1"), ("rel", "A1")]])
    assert ref.edges == {("A", "B"), ("B", "C"), ("A", "C")}
    # check=0 entries are skipped, not a stop: A, M(check=0), B gives A -> B.
    ref = Reference()
    ref.run([[("acq", "A1", "lock"), ("acq", MAP, "nocheck"), ("acq", "B1", "lock"),
              ("rel", "B1"), ("rel", MAP), ("rel", "A1")],
             [("acq", "B2", "lock"), ("acq", "A2", "lock"), ("rel", "A2"), ("rel", "B2")]])
    assert ref.edges == {("A", "B"), ("B", "A")} and ref.has_cycle()
    # X1 then X2: recursive, no edge.
    ref = Reference()
    ref.run([[("acq", "A1", "lock"), ("acq", "A2", "lock"), ("rel", "A2"), ("rel", "A1")]])
    assert ref.edges == set() and ref.recursive == {"A"}
