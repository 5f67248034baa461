"""Bookkeeping of the KV handoff transaction (pure: no I/O, no clocks; callers pass ``now``).

::

    decode side (D)                                   prefill side (P)
    reserve(rid, n, deadline) -> Reservation          (router picked D; D said yes)
                              | Refusal(reason)  ──▶  P decodes itself or asks another D
                                                      begin(rid, D, block_ids, deadline)
    ... transport: P send_blocks ──▶ D recv_blocks into reservation.block_ids ...
    commit(rid) -> block ids now owned by D's engine  acked(rid) -> release or keep as cache
    abort(rid) / expire(now): blocks go back          failed(rid) / expire(now): P keeps the
                              to D's pool                request (recompute or resend)

Decode invariants (``check_integrity``): every reserved block is held by exactly one
reservation, and blocks leave a reservation only through ``commit`` (to the engine) or
``abort`` / ``expire`` (back to the pool through ``free``), so nothing leaks under any
interleaving. Prefill sends do not own their blocks (P's pool holds the references; sends of two
requests may share prefix blocks); the tracker says when P may let go of them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class HandoffError(RuntimeError):
    """A caller broke the protocol (unknown request, duplicate id, bad pool answer)."""


class RefusalReason(str, enum.Enum):
    NO_BLOCKS = "no_blocks"  # the pool cannot give n blocks now
    DUPLICATE = "duplicate"  # a reservation for this request id is already open
    DEADLINE_PASSED = "deadline_passed"


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    block_ids: tuple[int, ...]  # receive the packed blocks into these, in order
    deadline: float


@dataclass(frozen=True, slots=True)
class Refusal:
    request_id: str
    reason: RefusalReason


class DecodeHandoffs:
    """D's open reservations. ``allocate(n)`` returns n distinct free block ids or None (never a
    partial list); ``free(ids)`` gives blocks back. With kvrelay's BlockPool:
    ``allocate=lambda n: pool.allocate(n) if pool.can_allocate(n) else None, free=pool.release``.
    """

    def __init__(
        self,
        allocate: Callable[[int], list[int] | None],
        free: Callable[[Sequence[int]], None],
    ) -> None:
        self._allocate = allocate
        self._free = free
        self._open: dict[str, Reservation] = {}
        self._holder: dict[int, str] = {}  # block id -> request id holding it

    def reserve(
        self, request_id: str, n_blocks: int, deadline: float, *, now: float | None = None
    ) -> Reservation | Refusal:
        if not request_id or n_blocks <= 0:
            raise HandoffError(f"bad reservation: request {request_id!r}, {n_blocks} blocks")
        if request_id in self._open:
            return Refusal(request_id, RefusalReason.DUPLICATE)
        if now is not None and deadline <= now:
            return Refusal(request_id, RefusalReason.DEADLINE_PASSED)
        ids = self._allocate(n_blocks)
        if ids is None:
            return Refusal(request_id, RefusalReason.NO_BLOCKS)
        if len(ids) != n_blocks or len(set(ids)) != n_blocks or any(b in self._holder for b in ids):
            self._free(ids)
            raise HandoffError(f"pool returned {ids!r} for {n_blocks} blocks (held or repeated)")
        reservation = Reservation(request_id, tuple(ids), deadline)
        self._open[request_id] = reservation
        for b in ids:
            self._holder[b] = request_id
        return reservation

    def commit(self, request_id: str) -> tuple[int, ...]:
        """The blocks arrived: they now belong to the decode engine (untracked here)."""
        return self._close(request_id).block_ids

    def abort(self, request_id: str) -> bool:
        """Give the blocks back (transfer failed, request cancelled). False if not open."""
        if request_id not in self._open:
            return False
        self._free(list(self._close(request_id).block_ids))
        return True

    def expire(self, now: float) -> list[str]:
        """Abort every reservation whose deadline has passed; returns their request ids."""
        late = [rid for rid, r in self._open.items() if r.deadline <= now]
        for rid in late:
            self.abort(rid)
        return late

    def get(self, request_id: str) -> Reservation | None:
        return self._open.get(request_id)

    def open_requests(self) -> list[str]:
        return list(self._open)

    @property
    def reserved_blocks(self) -> int:
        return len(self._holder)

    def _close(self, request_id: str) -> Reservation:
        reservation = self._open.pop(request_id, None)
        if reservation is None:
            raise HandoffError(f"no open reservation for {request_id!r}")
        for b in reservation.block_ids:
            del self._holder[b]
        return reservation

    def check_integrity(self) -> None:
        count = sum(len(r.block_ids) for r in self._open.values())
        if count != len(self._holder):
            raise AssertionError(f"{count} reserved block slots but {len(self._holder)} held")
        for rid, r in self._open.items():
            if r.request_id != rid:
                raise AssertionError(f"reservation filed under {rid!r} is {r.request_id!r}")
            for b in r.block_ids:
                if self._holder.get(b) != rid:
                    raise AssertionError(f"block {b} of {rid!r} held by {self._holder.get(b)!r}")


@dataclass(frozen=True, slots=True)
class OutgoingSend:
    request_id: str
    peer: str
    block_ids: tuple[int, ...]
    deadline: float


class PrefillHandoffs:
    """P's sends in flight. The caller keeps its pool references until a send closes
    (``acked``: release or keep as prefix cache; ``failed`` / expired: keep the request)."""

    def __init__(self) -> None:
        self._open: dict[str, OutgoingSend] = {}

    def begin(
        self, request_id: str, peer: str, block_ids: Sequence[int], deadline: float
    ) -> OutgoingSend:
        if request_id in self._open:
            raise HandoffError(f"send for {request_id!r} already in flight")
        if not block_ids or len(set(block_ids)) != len(block_ids):
            raise HandoffError(f"block ids must be non-empty and distinct: {list(block_ids)!r}")
        send = OutgoingSend(request_id, peer, tuple(block_ids), deadline)
        self._open[request_id] = send
        return send

    def acked(self, request_id: str) -> OutgoingSend:
        return self._pop(request_id)

    def failed(self, request_id: str) -> OutgoingSend:
        return self._pop(request_id)

    def expire(self, now: float) -> list[OutgoingSend]:
        late = [rid for rid, s in self._open.items() if s.deadline <= now]
        return [self._pop(rid) for rid in late]

    def peer_lost(self, peer: str) -> list[OutgoingSend]:
        """Close every send to a peer that died; the caller fails over those requests."""
        return [self._pop(rid) for rid, s in list(self._open.items()) if s.peer == peer]

    def outstanding(self) -> list[OutgoingSend]:
        return list(self._open.values())

    def _pop(self, request_id: str) -> OutgoingSend:
        send = self._open.pop(request_id, None)
        if send is None:
            raise HandoffError(f"no send in flight for {request_id!r}")
        return send

    def check_integrity(self) -> None:
        for rid, s in self._open.items():
            if s.request_id != rid or len(set(s.block_ids)) != len(s.block_ids):
                raise AssertionError(f"bad send record {s!r} under {rid!r}")
