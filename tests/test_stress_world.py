"""The stress world's swarm phases (stress.world.Swarm)."""

from __future__ import annotations

from stress.world import ROLES, Swarm


def quiet_set(s: Swarm, phase: int, roles: list[str]) -> set[str]:
    return {r for r in roles if s.quiet(r, s._t0 + (phase + 0.5) * Swarm.PHASE)}


def test_phase_zero_runs_every_role_then_phases_quiet_a_seeded_share() -> None:
    roles = [f"{r}{i}" for r in ROLES for i in range(60)]  # 420 names: the share shows
    s = Swarm(11, 0.3)
    assert quiet_set(s, 0, roles) == set()
    q1, q2 = quiet_set(s, 1, roles), quiet_set(s, 2, roles)
    assert 90 < len(q1) < 160 and 90 < len(q2) < 160 and q1 != q2
    assert quiet_set(Swarm(11, 0.3), 1, roles) == q1  # the seed fixes the phases' mixes
    assert quiet_set(Swarm(12, 0.3), 1, roles) != q1
    assert quiet_set(Swarm(11, 0.0), 1, roles) == set()  # --swarm 0: all run
