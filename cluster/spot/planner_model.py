"""The migration planner's vocabulary: the snapshot it reads and the plan it returns.

Everything here is a frozen value. Times are absolute seconds on the controller's clock
(``now`` and every ``deadline_s`` / ``eta_s`` share it); sizes are KV blocks and bytes.
The snapshot is validated once, where it is built (``ClusterSnapshot.__post_init__``); the
planner then trusts it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvrelay.workers.types import Phase, Role


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker_id: str
    role: Role
    free_blocks: int
    used_blocks: int
    block_bytes: int  # bytes of one KV block (all layers, K and V)
    max_seq_tokens: int  # longest prompt + output its engine keeps (WorkerInfo.max_seq_tokens)
    decode_step_s: float  # measured seconds per decode step at the current batch
    prefill_tps: float  # measured prefill tokens/s

    @property
    def total_blocks(self) -> int:
        return self.free_blocks + self.used_blocks


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    request_id: str
    worker_id: str
    phase: Phase
    prompt_tokens: int
    tokens_done: int  # output tokens committed
    tokens_left: int  # max_tokens - done: an upper bound (a stop may end it sooner)
    kv_blocks: int  # blocks it holds now; also what it needs on a target
    kv_bytes: int


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """Measured load, for pool rebalancing. Zeros mean "no figure": rebalance on what is
    in flight only."""

    arrival_rate: float = 0.0  # requests/s
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    safety_margin_s: float = 0.5  # SpotServe's margin before the deadline
    # A source's transfers share its link: when on, migrations out of one worker are
    # serialised (smallest first) and the ones that then miss the deadline fall back to
    # recompute. Off gives the pure separable assignment (what the brute-force tests check).
    serialize_source_egress: bool = True
    rebalance: bool = True


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    now: float
    workers: tuple[WorkerSnapshot, ...]
    requests: tuple[RequestSnapshot, ...]
    leaving: Mapping[str, float]  # worker id -> absolute deadline
    bandwidth_bps: float  # default link bandwidth, bytes/s
    pair_bandwidth_bps: Mapping[tuple[str, str], float] = field(default_factory=dict)
    load: LoadSnapshot = LoadSnapshot()
    # derived once: prompt tokens waiting for prefill per worker (queue ahead of a recompute)
    _queued: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [w.worker_id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate worker ids in snapshot")
        known = set(ids)
        for w in self.workers:
            if min(w.free_blocks, w.used_blocks, w.block_bytes, w.max_seq_tokens) < 0:
                raise ValueError(f"worker {w.worker_id}: negative block figures")
            if w.decode_step_s <= 0 or w.prefill_tps <= 0:
                raise ValueError(f"worker {w.worker_id}: step time and prefill tps must be > 0")
        rids = [r.request_id for r in self.requests]
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate request ids in snapshot")
        for r in self.requests:
            if r.worker_id not in known:
                raise ValueError(f"request {r.request_id} on unknown worker {r.worker_id}")
            if min(r.prompt_tokens, r.tokens_done, r.tokens_left, r.kv_blocks, r.kv_bytes) < 0:
                raise ValueError(f"request {r.request_id}: negative figures")
        for wid in self.leaving:
            if wid not in known:
                raise ValueError(f"leaving worker {wid} is not in the snapshot")
        if self.bandwidth_bps <= 0 or any(b <= 0 for b in self.pair_bandwidth_bps.values()):
            raise ValueError("bandwidth must be > 0")
        queued = dict.fromkeys(ids, 0)
        for r in self.requests:
            if r.phase is not Phase.DECODE:
                queued[r.worker_id] += r.prompt_tokens
        object.__setattr__(self, "_queued", queued)

    def queued_prompt_tokens(self, worker_id: str) -> int:
        return self._queued[worker_id]

    def bandwidth(self, src: str, dst: str) -> float:
        return self.pair_bandwidth_bps.get((src, dst), self.bandwidth_bps)


# ---- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinishInPlace:
    request_id: str
    worker_id: str
    eta_s: float  # when it will be done


@dataclass(frozen=True, slots=True)
class MigrateKV:
    request_id: str
    source: str
    target: str
    kv_bytes: int
    eta_s: float  # when it will be decoding again on the target


@dataclass(frozen=True, slots=True)
class Recompute:
    request_id: str
    source: str
    target: str
    tokens: int  # prompt + committed output tokens re-run on the target
    eta_s: float  # when it will be decoding again (or, if queued, done with prefill)
    why: str = ""  # e.g. why it did not migrate


class UnplaceableReason(str, enum.Enum):
    NO_CAPACITY = "no_capacity"  # targets exist, but none has free blocks for it
    NO_TARGET = "no_target"  # no surviving worker can take this phase at all
    TOO_LARGE = "too_large"  # no capable survivor's pool holds it to its end (prompt + max_tokens)


@dataclass(frozen=True, slots=True)
class Unplaceable:
    request_id: str
    source: str
    reason: UnplaceableReason
    detail: str


@dataclass(frozen=True, slots=True)
class SwitchRole:
    worker_id: str
    from_role: Role
    to_role: Role
    reason: str


RequestAction = FinishInPlace | MigrateKV | Recompute


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """Every request on a leaving worker appears exactly once, in ``actions`` or in
    ``unplaceable``. Role switches apply before the moves (targets are chosen by new role)."""

    actions: tuple[RequestAction, ...] = ()
    unplaceable: tuple[Unplaceable, ...] = ()
    switches: tuple[SwitchRole, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.actions or self.unplaceable or self.switches)

    def action_for(self, request_id: str) -> RequestAction | Unplaceable:
        for a in (*self.actions, *self.unplaceable):
            if a.request_id == request_id:
                return a
        raise KeyError(request_id)
