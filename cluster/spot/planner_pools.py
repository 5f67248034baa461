"""Pool rebalancing for the migration planner: which surviving worker should change role.

Load model (fractions of one worker, so the two pools compare):

    decode_need  = decode KV blocks in flight (movers included)          / blocks per worker
                 + λ · mean_output · step_s · blocks per decode request  / blocks per worker
    prefill_need = λ · mean_prompt / prefill_tps
                 + queued prompt tokens / (prefill_tps · drain_horizon_s)

A colocated worker counts half to each pool. A pool with demand and no worker always gets
one (from the other pool if it can spare one, else the last survivor turns colocated); after
that, while a pool is overloaded (need / have > 1), a worker moves if the move lowers the
higher of the two utilisations.
Pure: snapshot in, switches out.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvrelay.cluster.spot.planner_model import (
    ClusterSnapshot,
    RequestSnapshot,
    SwitchRole,
    WorkerSnapshot,
)
from kvrelay.workers.types import Phase, Role

DRAIN_HORIZON_S = 10.0  # a queued backlog should drain within this long
OVERLOADED = 1.0  # switch only while a pool needs more than it has (need / have > 1)


def _have(roles: Mapping[str, Role]) -> tuple[float, float]:
    p = sum(
        1.0 if r is Role.PREFILL else 0.5 if r is Role.COLOCATED else 0.0 for r in roles.values()
    )
    d = sum(
        1.0 if r is Role.DECODE else 0.5 if r is Role.COLOCATED else 0.0 for r in roles.values()
    )
    return p, d


def _needs(snap: ClusterSnapshot, survivors: list[WorkerSnapshot]) -> tuple[float, float]:
    blocks_per_worker = sum(w.total_blocks for w in survivors) / len(survivors) or 1.0
    tps = sum(w.prefill_tps for w in survivors) / len(survivors)
    step = sum(w.decode_step_s for w in survivors) / len(survivors)
    decoding: list[RequestSnapshot] = [r for r in snap.requests if r.phase is Phase.DECODE]
    queued_tokens = sum(r.prompt_tokens for r in snap.requests if r.phase is not Phase.DECODE)
    decode_blocks = sum(r.kv_blocks for r in decoding)
    per_req = decode_blocks / len(decoding) if decoding else 1.0
    load = snap.load
    in_decode = load.arrival_rate * load.mean_output_tokens * step  # Little's law
    decode_need = (decode_blocks + in_decode * per_req) / blocks_per_worker
    prefill_need = load.arrival_rate * load.mean_prompt_tokens / tps + queued_tokens / (
        tps * DRAIN_HORIZON_S
    )
    return prefill_need, decode_need


def _util(need: float, have: float) -> float:
    if need <= 0:
        return 0.0
    return need / have if have > 0 else float("inf")


def rebalance_roles(snap: ClusterSnapshot) -> tuple[dict[str, Role], tuple[SwitchRole, ...]]:
    """Roles of the surviving workers after rebalancing, and the switches that get there."""
    survivors = [w for w in snap.workers if w.worker_id not in snap.leaving]
    roles = {w.worker_id: w.role for w in survivors}
    if not survivors:
        return roles, ()
    by_id = {w.worker_id: w for w in survivors}
    need_p, need_d = _needs(snap, survivors)

    def donor(role: Role) -> str | None:
        # the cheapest worker to convert: fewest used blocks (decode) or least queue (prefill)
        cands = [wid for wid, r in roles.items() if r is role]
        if not cands:
            return None
        return min(
            cands, key=lambda wid: (by_id[wid].used_blocks + snap.queued_prompt_tokens(wid), wid)
        )

    switches: list[SwitchRole] = []
    for _ in range(len(survivors)):
        have_p, have_d = _have(roles)
        up, ud = _util(need_p, have_p), _util(need_d, have_d)
        hungry, spare = (Role.DECODE, Role.PREFILL) if ud > up else (Role.PREFILL, Role.DECODE)
        u_hi = max(up, ud)
        if u_hi <= OVERLOADED:
            break  # balanced enough: a switch costs a drain, do not chase small gains
        wid = donor(spare)
        if wid is None:
            break
        if sum(1 for r in roles.values() if r is spare) == 1 and len(survivors) == 1:
            # the last worker serves both phases
            new = Role.COLOCATED
        elif sum(1 for r in roles.values() if r is spare) == 1:
            break  # never empty a pool
        else:
            new = hungry
        trial = dict(roles)
        trial[wid] = new
        tp, td = _have(trial)
        if max(_util(need_p, tp), _util(need_d, td)) >= u_hi:
            break
        why = f"{hungry.value} utilisation {u_hi:.2f} (need {need_d if hungry is Role.DECODE else need_p:.2f} workers)"
        switches.append(SwitchRole(wid, roles[wid], new, why))
        roles = trial
    return roles, tuple(switches)
