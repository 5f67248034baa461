"""The pure cores behind readiness, admission against capacity, and pool supervision."""

from __future__ import annotations

import itertools

from kvrelay.cluster.controller.capacity import PoolMember, largest_prompt, readiness, servable
from kvrelay.cluster.controller.supervisor import Supervision

SIZES = {"prefill": 1, "decode": 1, "colocated": 0}


def member(wid: str, role: str, blocks: int = 100, *, healthy: bool = True,
           draining: bool = False) -> PoolMember:
    return PoolMember(wid, role, healthy, draining, blocks)


def test_ready_needs_a_usable_worker_in_every_configured_pool() -> None:
    assert not readiness([], SIZES).ready
    assert readiness([], SIZES).missing == ("prefill", "decode")
    p, d = member("p", "prefill"), member("d", "decode")
    assert not readiness([p], SIZES).ready
    assert readiness([p, d], SIZES).ready
    assert not readiness([p, member("d", "decode", draining=True)], SIZES).ready
    assert not readiness([p, member("d", "decode", healthy=False)], SIZES).ready
    assert "decode" in readiness([p], SIZES).reason()
    assert readiness([member("c", "colocated")], {}).ready  # no sizes: any worker


def test_servable_and_largest_prompt() -> None:
    assert not servable([member("p", "prefill", draining=True)])
    assert servable([member("p", "prefill")])
    assert largest_prompt([], 16) is None
    # P/D: the smaller of the largest prefill-capable and decode-capable pools, minus one token
    pools = [member("p1", "prefill", 100), member("p2", "prefill", 300), member("d", "decode", 200)]
    assert largest_prompt(pools, 16) == 200 * 16 - 1
    assert largest_prompt([member("p", "prefill", 50)], 16) == 50 * 16 - 1  # alone: its own pool
    assert largest_prompt([member("p", "prefill", 50, draining=True)], 16) is None


def test_supervision_replaces_what_is_missing_with_backoff() -> None:
    sup = Supervision(SIZES, base_s=1.0, max_backoff_s=8.0)
    assert sup.due(0.0, {"prefill": 1, "decode": 1}, {}) == []
    assert sup.due(0.0, {"prefill": 1}, {}) == ["decode"]
    assert sup.due(0.0, {"prefill": 1}, {"decode": 1}) == []  # one is already starting
    starts = []
    now = 0.0
    while now < 40.0:  # the replacement keeps dying: starts thin out, then every 8 s
        if sup.due(now, {"prefill": 1}, {}):
            sup.started("decode", now)
            starts.append(now)
        now += 0.25
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == [1.0, 2.0, 4.0, 8.0] and set(gaps[4:]) == {8.0}


def test_supervision_with_pool_sizing_keeps_the_total_only() -> None:
    sup = Supervision(SIZES, keep_total_only=True)
    assert sup.due(0.0, {"decode": 2}, {}) == []  # the planner turned P into D: fine
    assert sup.due(0.0, {"decode": 1}, {}) == ["prefill"]
