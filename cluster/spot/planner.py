"""Migration planner (SpotServe's recovery rule applied to PD pools): snapshot in, plan out.

For every request on a leaving worker, in this order:

1. **Finish in place** when its remaining work fits before ``deadline - now - margin``
   (decode: ``tokens_left · step_s``; prefill: ``prompt / tps`` more on top).
2. Otherwise it is **moved**. Each (request, surviving target) pair gets one option and cost:
   ``MigrateKV`` when the request holds KV and ``kv_bytes / bandwidth`` ends before the
   deadline (migration is preferred whenever it fits), else ``Recompute`` of prompt + committed
   tokens at the target's prefill rate behind its queue. Cost = estimated seconds until the
   request is decoding again. A moved request decodes where it lands (a recompute is not
   handed off again), so a target whose pool cannot hold it to its end (prompt + max_tokens,
   or as far as its source's could: ``final_tokens``) would cut it short: that pair is
   infeasible, like one whose role cannot take the request's phase. The
   assignment minimises the total with Kuhn–Munkres (``scipy.optimize.linear_sum_assignment``)
   over capacity slots:

       columns = [ block slots of w0 | block slots of w1 | ... | queue slots ... | unplaced_r ]
       block slots of w = free_blocks(w) // b,  b = the largest need among the movers
       queue slots (need-0 queued requests): slot k of w costs k−1 more mean prefills
       unplaced_r (one per request) costs UNPLACED: any feasible placement beats it;
       infeasible pairs cost INFEASIBLE > UNPLACED and are filtered out.

   With uneven needs ``b`` is conservative; a greedy pass then places what is left into the
   blocks really free. With egress serialisation on, a source's migrations run one after the
   other (smallest first) and the ones that would then end after the deadline recompute.
3. **Rebalance** (cluster/spot/planner_pools.py) runs first, so targets are chosen by new role.

Block-needing and queued requests never compete for a column, so the two groups are solved
apart (exact). Measured here (2 busy cores): 64 requests on 2 of 8 leaving workers in ~1 ms,
256 on 4 of 16 in ~25 ms, 512 on 8 of 32 in ~0.15 s, 1024 on 16 of 64 in ~1-2 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvrelay.cluster.spot.planner_model import (
    ClusterSnapshot,
    FinishInPlace,
    MigrateKV,
    MigrationPlan,
    PlannerConfig,
    Recompute,
    RequestAction,
    RequestSnapshot,
    Unplaceable,
    UnplaceableReason,
    WorkerSnapshot,
)
from kvrelay.cluster.spot.planner_pools import rebalance_roles
from kvrelay.workers.types import Phase, Role

UNPLACED = 1e7  # seconds: the price of leaving a request without a target
INFEASIBLE = 1e9


@dataclass(frozen=True, slots=True)
class _Option:
    """One way to move one request to one target; ``cost`` is seconds from now."""

    migrate: bool
    cost: float
    need: int  # blocks taken on the target


def finish_in_place_eta(r: RequestSnapshot, w: WorkerSnapshot, now: float) -> float:
    work = r.tokens_left * w.decode_step_s
    if r.phase is not Phase.DECODE:
        work += r.prompt_tokens / w.prefill_tps
    return now + work


def _fits_in_place(
    r: RequestSnapshot, w: WorkerSnapshot, snap: ClusterSnapshot, cfg: PlannerConfig
) -> bool:
    if r.phase is Phase.QUEUED:
        return False  # nothing computed yet: moving it costs nothing
    remain = snap.leaving[r.worker_id] - snap.now - cfg.safety_margin_s
    return finish_in_place_eta(r, w, snap.now) - snap.now <= remain


def _can_take(role: Role, phase: Phase) -> bool:
    return role.decodes if phase is Phase.DECODE else role.prefills


def final_tokens(r: RequestSnapshot, source: WorkerSnapshot) -> int:
    """Tokens ``r`` holds at its end: prompt + max_tokens, or as many as its source's pool keeps
    (the engine ends a request there). A target with a smaller ``max_seq_tokens`` would cut it."""
    return min(r.prompt_tokens + r.tokens_done + r.tokens_left, source.max_seq_tokens)


def _queue_s(snap: ClusterSnapshot, w: WorkerSnapshot) -> float:
    return snap.queued_prompt_tokens(w.worker_id) / w.prefill_tps


def pair_option(
    snap: ClusterSnapshot, cfg: PlannerConfig, r: RequestSnapshot, w: WorkerSnapshot
) -> _Option:
    """The option for moving ``r`` to ``w`` (capacity aside): migrate when it fits."""
    deadline = snap.leaving[r.worker_id] - cfg.safety_margin_s
    if r.kv_blocks > 0 and r.phase is not Phase.QUEUED:
        transfer = r.kv_bytes / snap.bandwidth(r.worker_id, w.worker_id)
        if snap.now + transfer <= deadline:
            resume = w.decode_step_s if r.phase is Phase.DECODE else 0.0
            return _Option(True, transfer + resume, r.kv_blocks)
    return _Option(False, pair_option_recompute_s(snap, r, w), r.kv_blocks)


def pair_option_recompute_s(snap: ClusterSnapshot, r: RequestSnapshot, w: WorkerSnapshot) -> float:
    """Seconds until ``r`` recomputed on ``w`` is decoding again (queue + prompt + done)."""
    cost = _queue_s(snap, w) + (r.prompt_tokens + r.tokens_done) / w.prefill_tps
    return cost + (w.decode_step_s if r.phase is Phase.DECODE else 0.0)


def plan_migration(snap: ClusterSnapshot, cfg: PlannerConfig = PlannerConfig()) -> MigrationPlan:
    if not snap.leaving:
        return MigrationPlan()
    workers = {w.worker_id: w for w in snap.workers}
    on_leaving = [r for r in snap.requests if r.worker_id in snap.leaving]

    finish: list[RequestAction] = []
    movers: list[RequestSnapshot] = []
    for r in on_leaving:
        w = workers[r.worker_id]
        if _fits_in_place(r, w, snap, cfg):
            finish.append(
                FinishInPlace(r.request_id, w.worker_id, finish_in_place_eta(r, w, snap.now))
            )
        else:
            movers.append(r)

    roles, switches = (
        rebalance_roles(snap)
        if cfg.rebalance
        else (
            {w.worker_id: w.role for w in snap.workers if w.worker_id not in snap.leaving},
            (),
        )
    )
    moved, unplaceable = _assign(snap, cfg, movers, roles)
    if cfg.serialize_source_egress:
        moved = _serialize_egress(snap, cfg, moved)
    # switches only matter when someone leaves; keep them even with no movers
    return MigrationPlan(tuple(finish) + tuple(moved), tuple(unplaceable), tuple(switches))


def _assign(
    snap: ClusterSnapshot,
    cfg: PlannerConfig,
    movers: list[RequestSnapshot],
    roles: dict[str, Role],
) -> tuple[list[RequestAction], list[Unplaceable]]:
    if not movers:
        return [], []
    targets = [w for w in snap.workers if w.worker_id in roles]
    n = len(movers)
    needs = [r.kv_blocks for r in movers]
    b = max(needs)
    workers = {w.worker_id: w for w in snap.workers}
    opts = [[pair_option(snap, cfg, r, w) for w in targets] for r in movers]
    role_ok = [[_can_take(roles[w.worker_id], r.phase) for w in targets] for r in movers]
    final = [final_tokens(r, workers[r.worker_id]) for r in movers]
    ok = [
        [fit and w.max_seq_tokens >= final[i] for w, fit in zip(targets, role_ok[i], strict=True)]
        for i in range(n)
    ]

    # columns: (target index j, kind k): k = 0 a block slot, k >= 1 the k-th queue slot
    col_j: list[int] = []
    col_k: list[int] = []
    for j, w in enumerate(targets):
        slots = min(n, w.free_blocks // b) if b > 0 else 0
        col_j += [j] * slots
        col_k += [0] * slots
    n_queued = sum(1 for r in movers if r.kv_blocks == 0)
    mean_prompt = sum(r.prompt_tokens for r in movers if r.kv_blocks == 0) / max(n_queued, 1)
    for j in range(len(targets)) if n_queued else ():
        col_j += [j] * n_queued
        col_k += range(1, n_queued + 1)
    cols = list(zip(col_j, col_k, strict=True))
    cj, ck = np.asarray(col_j, dtype=np.int64), np.asarray(col_k, dtype=np.int64)
    # pair costs [n, W] -> slot costs [n, m]; infeasible pairs and wrong-kind slots masked
    pair = np.array([[o.cost for o in row] for row in opts]).reshape(n, len(targets))
    fits = np.array(ok, dtype=bool).reshape(n, len(targets))
    tps = np.array([w.prefill_tps for w in targets])
    extra = np.where(ck > 0, (ck - 1) * mean_prompt / tps[cj], 0.0) if len(cols) else ck * 0.0
    kind_ok = (ck == 0)[None, :] == (np.asarray(needs) > 0)[:, None]
    slot_cost = np.where(fits[:, cj] & kind_ok, pair[:, cj] + extra[None, :], INFEASIBLE)
    cost = np.full((n, len(cols) + n), INFEASIBLE)
    cost[:, : len(cols)] = slot_cost
    cost[np.arange(n), len(cols) + np.arange(n)] = UNPLACED
    actions: list[RequestAction] = []
    left: list[int] = []
    used = {w.worker_id: 0 for w in targets}
    for i, c in _solve(cost, needs, len(cols)):
        if c >= len(cols) or cost[i, c] >= INFEASIBLE:
            left.append(i)
            continue
        j, _ = cols[c]
        used[targets[j].worker_id] += needs[i]
        actions.append(_action(snap, movers[i], targets[j], opts[i][j], float(cost[i, c])))

    # greedy fill: uneven needs leave real free blocks the conservative slots did not offer
    unplaceable: list[Unplaceable] = []
    for i in sorted(left, key=lambda i: needs[i]):
        r = movers[i]
        best = None
        for j, w in enumerate(targets):
            if ok[i][j] and w.free_blocks - used[w.worker_id] >= needs[i]:
                if best is None or opts[i][j].cost < opts[i][best].cost:
                    best = j
        if best is not None:
            used[targets[best].worker_id] += needs[i]
            actions.append(_action(snap, r, targets[best], opts[i][best], opts[i][best].cost))
        else:
            unplaceable.append(_why_unplaceable(r, final[i], targets, role_ok[i], ok[i], used))
    return actions, unplaceable


def _solve(cost: np.ndarray, needs: list[int], m: int) -> list[tuple[int, int]]:
    """Kuhn–Munkres on ``cost`` [n, m + n]. Block-needing and queued requests never share a
    column, so they are solved apart, each on the columns some row can use (exact, smaller)."""
    # imported here: scipy.optimize takes ~0.4 s to import, and every worker process imports
    # this module (through the actors) while only the controller ever plans
    from scipy.optimize import linear_sum_assignment

    out: list[tuple[int, int]] = []
    has_kv = np.asarray(needs) > 0
    for group in (np.flatnonzero(has_kv), np.flatnonzero(~has_kv)):
        if not len(group):
            continue
        usable = np.flatnonzero((cost[group, :m] < INFEASIBLE).any(axis=0))
        cols = np.concatenate([usable, m + group])  # + the group's own "unplaced" columns
        rows, picked = linear_sum_assignment(cost[np.ix_(group, cols)])
        out += [(int(group[r]), int(cols[c])) for r, c in zip(rows, picked, strict=True)]
    return out


def _action(
    snap: ClusterSnapshot, r: RequestSnapshot, w: WorkerSnapshot, opt: _Option, cost: float
) -> RequestAction:
    if opt.migrate:
        return MigrateKV(r.request_id, r.worker_id, w.worker_id, r.kv_bytes, snap.now + cost)
    why = (
        "no KV to move"
        if r.kv_blocks == 0 or r.phase is Phase.QUEUED
        else ("transfer does not fit before the deadline")
    )
    return Recompute(
        r.request_id,
        r.worker_id,
        w.worker_id,
        r.prompt_tokens + r.tokens_done,
        snap.now + cost,
        why,
    )


def _why_unplaceable(
    r: RequestSnapshot,
    final: int,
    targets: list[WorkerSnapshot],
    role_ok: list[bool],
    ok: list[bool],
    used: dict[str, int],
) -> Unplaceable:
    kind = "decode" if r.phase is Phase.DECODE else "prefill"
    by_role = [w for w, fit in zip(targets, role_ok, strict=True) if fit]
    if not by_role:
        return Unplaceable(
            r.request_id,
            r.worker_id,
            UnplaceableReason.NO_TARGET,
            f"no surviving {kind}-capable worker ({len(targets)} survivors)",
        )
    capable = [w for w, fit in zip(targets, ok, strict=True) if fit]
    if not capable:
        return Unplaceable(
            r.request_id,
            r.worker_id,
            UnplaceableReason.TOO_LARGE,
            f"needs {final} tokens (prompt + max_tokens); no surviving {kind}-capable worker's "
            f"pool holds that (largest {max(w.max_seq_tokens for w in by_role)})",
        )
    most = max(w.free_blocks - used[w.worker_id] for w in capable)
    return Unplaceable(
        r.request_id,
        r.worker_id,
        UnplaceableReason.NO_CAPACITY,
        f"needs {r.kv_blocks} blocks; most left on a {kind}-capable survivor is {most}",
    )


def _serialize_egress(
    snap: ClusterSnapshot, cfg: PlannerConfig, actions: list[RequestAction]
) -> list[RequestAction]:
    """A source's migrations share its link: run smallest first, downgrade the late ones."""
    reqs = {r.request_id: r for r in snap.requests}
    workers = {w.worker_id: w for w in snap.workers}
    out: list[RequestAction] = [a for a in actions if not isinstance(a, MigrateKV)]
    migs = sorted(
        (a for a in actions if isinstance(a, MigrateKV)), key=lambda a: (a.source, a.kv_bytes)
    )
    clock: dict[str, float] = {}
    for a in migs:
        start = clock.get(a.source, snap.now)
        end = start + a.kv_bytes / snap.bandwidth(a.source, a.target)
        if end <= snap.leaving[a.source] - cfg.safety_margin_s:
            clock[a.source] = end
            resume = (
                workers[a.target].decode_step_s if reqs[a.request_id].phase is Phase.DECODE else 0.0
            )
            out.append(MigrateKV(a.request_id, a.source, a.target, a.kv_bytes, end + resume))
            continue
        r, w = reqs[a.request_id], workers[a.target]
        tokens = r.prompt_tokens + r.tokens_done
        eta = snap.now + pair_option_recompute_s(snap, r, w)
        out.append(
            Recompute(
                a.request_id,
                a.source,
                a.target,
                tokens,
                eta,
                "source link busy: transfer would end after the deadline",
            )
        )
    return out


__all__ = ["final_tokens", "finish_in_place_eta", "pair_option", "plan_migration"]
