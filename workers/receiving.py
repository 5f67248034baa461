"""The receiving side of a KV handoff: blocks reserved for a payload, the receive into them,
and what continues in them. ``Reservations`` owns a worker's reservations (worker.py: its
``reserve``, ``recv_kv``, ``accept_prefilled``, ``commit_prefix``, ``unreserve`` and
``expire_reservations`` hand over to it)::

    reserve(rid, n)         -> block ids | None (refusal), held until the deadline
    receive(rid, fill)      the payload lands in the reserved blocks
    accept(rid, ...)        the request continues in them       (a handoff, a migration)
    commit_prefix(rid, ..)  their hashes recorded, left cached  (a prefix pull)

While a receive runs, only its thread frees the blocks (an unreserve then marks the reservation
cancelled): a late payload never lands in blocks that were handed to another request. Every
engine access goes through the loop thread; a reservation expires at its deadline unless a
receive into it is running (a receive ends by its own deadline).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.types import SamplingParams


@dataclass(slots=True)
class _Reservation:
    """Blocks held for an incoming handoff. While ``receiving``, only the receiving thread
    may free them (an unreserve then just marks ``cancelled``): a late payload must never land
    in blocks that were handed to another request."""

    block_ids: list[int]
    deadline: float
    receiving: bool = False
    received: bool = False
    cancelled: bool = False


class Reservations:
    """The blocks reserved on ``loop``'s engine for incoming payloads, by request (or pull) id:
    the one owner of them and of their lock."""

    def __init__(self, loop: EngineLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._held: dict[str, _Reservation] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def block_ids(self) -> list[list[int]]:
        """Each reservation's blocks, read at one time (an ownership check's)."""
        with self._lock:
            return [list(r.block_ids) for r in self._held.values()]

    def reserve(self, request_id: str, num_blocks: int, deadline_s: float) -> list[int] | None:
        self.expire()
        blocks = self._loop.call(lambda e: e.reserve(num_blocks))
        if blocks is not None:
            with self._lock:
                self._held[request_id] = _Reservation(blocks, deadline_s)
        return blocks

    def receive(
        self, request_id: str, fill: Callable[[list[int]], int], faults: Collection[str] = ()
    ) -> int:
        """Receive into ``request_id``'s open reservation: ``fill(block_ids)`` lands the payload
        and returns its bytes. ``faults``: the worker's chaos hooks (``exit_in_recv``,
        ``hang_in_recv``: ``Worker.inject_fault``)."""
        with self._lock:
            res = self._held.get(request_id)
            if res is None or res.receiving or res.received:
                raise RuntimeError(f"no open reservation for {request_id}")
            res.receiving = True
        if "exit_in_recv" in faults:
            os._exit(17)
        try:
            if "hang_in_recv" in faults:
                while not res.cancelled:  # a chaos hook's wait, not a synchronisation
                    time.sleep(0.01)
                raise RuntimeError(f"receive of {request_id} wedged (fault hang_in_recv)")
            # reserved blocks: no sequence reads them until accept
            nbytes = fill(res.block_ids)
        except BaseException:
            self._end_receive(request_id, res, ok=False)
            raise
        if not self._end_receive(request_id, res, ok=True):
            raise RuntimeError(f"reservation for {request_id} was cancelled during the transfer")
        return int(nbytes)

    def _end_receive(self, request_id: str, res: _Reservation, *, ok: bool) -> bool:
        """Close a receive; frees the blocks when it failed or was cancelled meanwhile."""
        with self._lock:
            res.receiving = False
            keep = ok and not res.cancelled
            if keep:
                res.received = True
            elif self._held.get(request_id) is res:
                del self._held[request_id]
        if not keep:
            self._loop.call(lambda e: e.unreserve(res.block_ids))
        return keep

    def _take_received(self, request_id: str, what: str) -> _Reservation:
        """Take ``request_id``'s reservation out (KeyError: none); one whose KV has not
        arrived is freed and ``what`` (accept, commit) fails."""
        with self._lock:
            res = self._held.pop(request_id)
        if not res.received:
            self._loop.call(lambda e: e.unreserve(res.block_ids))
            raise RuntimeError(f"{what} of {request_id} before its KV arrived")
        return res

    def accept(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        params: SamplingParams,
        *,
        tenant: str,
        priority: int,
        num_computed: int | None,
        arrival_time: float | None = None,
    ) -> None:
        """The request continues in its received blocks (``continue_prefilled``)."""
        res = self._take_received(request_id, "accept")
        self._loop.call(
            lambda e: continue_prefilled(
                e, request_id, prompt_ids, output_ids, params, res.block_ids,
                tenant=tenant, priority=priority, num_computed=num_computed,
                arrival_time=arrival_time,
            )
        )  # fmt: skip

    def commit_prefix(self, reservation_id: str, block_hashes: Sequence[int]) -> int:
        """Pulled blocks arrived in a reservation: record their hashes and leave them cached.
        Returns blocks kept."""
        res = self._take_received(reservation_id, "commit")

        def commit(e: Engine) -> int:
            kept = sum(
                e.pool.commit(b, h) for b, h in zip(res.block_ids, block_hashes, strict=True)
            )
            e.pool.release(reversed(res.block_ids))
            return kept

        return self._loop.call(commit)

    def unreserve(self, request_id: str) -> bool:
        with self._lock:
            res = self._held.pop(request_id, None)
            if res is None:
                return False
            if res.receiving:  # the receiving thread frees them when it ends
                res.cancelled = True
                return True
        self._loop.call(lambda e: e.unreserve(res.block_ids))
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._lock:
            gone = [
                rid for rid, r in self._held.items()
                if r.deadline < now and not r.receiving  # a receive ends by its own deadline
            ]  # fmt: skip
        for rid in gone:
            self.unreserve(rid)
        return gone


def continue_prefilled(
    e: Engine,
    request_id: str,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    params: SamplingParams,
    block_ids: Sequence[int],
    *,
    tenant: str,
    priority: int,
    num_computed: int | None,
    block_hashes: Sequence[int] = (),
    committed_blocks: int = 0,
    arrival_time: float | None = None,
) -> None:
    """``e`` continues a request whose KV is in ``block_ids`` (``num_computed`` tokens of it;
    None: the prompt's). ``block_hashes`` / ``committed_blocks``: as ``Engine.add_prefilled``
    (blocks already committed in ``e``'s pool)."""
    e.add_prefilled(
        request_id, prompt_ids, output_ids, params, block_ids, tenant=tenant, priority=priority,
        block_hashes=block_hashes, committed_blocks=committed_blocks, arrival_time=arrival_time,
    )  # fmt: skip
    seq = e.seqs[request_id]
    extra = (num_computed or 0) - seq.num_computed
    if extra > 0:
        e.scheduler.commit_computed(ScheduledSeq(seq, extra))
