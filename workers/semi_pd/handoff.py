"""The handoff inside a semi-PD worker: a request's blocks pass from the prefill lane to the
decode lane by block ids, no bytes moved.

::

    prefill lane: first token ─▶ hand_over (its sequence, block references and all)
        ─▶ transit ─▶ one adoption command a burst on the decode lane ─▶ add_prefilled

``InsideHandoff`` owns what is between the lanes: the requests whose handoff stays inside the
worker (the controller asked for no ``prefill_only``), those in transit (handed over, not
adopted yet: their blocks are theirs), the adoption command queued on the decode lane, and
the first tokens held for their adoption (``hold_first``). The prefill lane calls
``first_tokens`` and ``hand_over`` from its sink, the decode lane runs the adoption command,
the worker calls ``stays`` / ``forget`` (submit) and ``drop`` (abort); its own lock guards
the state, taken after the storage lock where both are held.

First token: sent by the prefill lane as soon as it is sampled, or (``hold_first``) held and
sent by the adoption command just before the decode lane's first step with the request: one
FIFO outbox keeps it ahead of the decode lane's later tokens. The gap between a request's
first and second token is otherwise the handoff's: the adoption waits for the decode step in
flight, then the first decode step runs, both beside the prefill lane's next chunk (H100,
2026-12-06, 128 req/s: ``adopt_wait`` 7 ms p50, ``handoff_gap`` 20 / 45 ms p50 / p99, where a
decode step took 3 / 21); held, the first token comes later by the adoption's wait (its TTFT),
the stream after it evenly, every later token at the same time. A held token goes out with an
adoption that failed (then the abort), and nowhere for a request aborted in transit.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.engine.sequence import Sequence as EngineSequence
from kvrelay.workers.receiving import continue_prefilled
from kvrelay.workers.semi_pd.lanes import HandoffClock
from kvrelay.workers.semi_pd.tuner import SplitTuner
from kvrelay.workers.types import FinishReason, TokenEvent

log = logging.getLogger(__name__)


class InsideHandoff:
    def __init__(
        self, clock: HandoffClock, *, hold_first: bool, tuner: SplitTuner | None = None
    ) -> None:
        """``clock``: each handoff's parts, on the decode lane's figures; ``hold_first``: the
        adoption sends a handed over request's first token; ``tuner``: told when a held first
        token goes out (its TTFT)."""
        self.clock = clock
        self.hold_first = hold_first
        self.tuner = tuner
        self.handovers = 0  # handoffs adopted (block ids moved, no bytes)
        self._lock = threading.Lock()
        self._inside: set[str] = set()  # requests whose handoff stays inside
        self._transit: dict[str, EngineSequence] = {}  # handed over, not adopted yet
        self._to_adopt: list[str] = []  # handed over since the last adoption command
        self._adopt_queued = False  # an adoption command is queued on the decode lane
        self._held: dict[str, TokenEvent] = {}  # first tokens held for their adoption
        self._decode: EngineLoop | None = None
        self._outbox: Outbox | None = None

    def attach(self, decode: EngineLoop, outbox: Outbox) -> None:
        """The decode lane that adopts, and the outbox both lanes queue tokens on."""
        self._decode, self._outbox = decode, outbox

    # ---- the worker's side ---------------------------------------------------------------
    def stays(self, request_id: str) -> None:
        """``request_id`` continues on the decode lane after its first token."""
        with self._lock:
            self._inside.add(request_id)

    def forget(self, request_id: str) -> None:
        """``request_id`` will not be handed over here after all (its submission failed)."""
        with self._lock:
            self._inside.discard(request_id)

    def drop(self, request_id: str) -> EngineSequence | None:
        """An abort: the request in transit, if it is (the caller releases its blocks, storage
        lock held since before this call, so its blocks are never owned by nobody); a held
        first token goes nowhere."""
        with self._lock:
            self._inside.discard(request_id)
            seq = self._transit.pop(request_id, None)
            self._held.pop(request_id, None)
        self.clock.forget(request_id)
        return seq

    def in_transit(self) -> dict[str, EngineSequence]:
        """The requests handed over and not adopted yet (a copy)."""
        with self._lock:
            return dict(self._transit)

    def held(self) -> list[str]:
        """The requests whose first token is held for their adoption."""
        with self._lock:
            return list(self._held)

    # ---- the prefill lane's side ---------------------------------------------------------
    def first_tokens(self, events: list[TokenEvent]) -> tuple[list[TokenEvent], list[str]]:
        """A prefill step's events: those to queue now, and the requests to hand over (after
        their tokens were queued). With ``hold_first`` those requests' tokens are held, before
        the handover: their adoption sends them."""
        handing: list[str] = []
        with self._lock:
            for ev in events:
                if ev.finish_reason is not None:
                    self._inside.discard(ev.request_id)  # done at its first token
                elif ev.request_id in self._inside:
                    handing.append(ev.request_id)
            if not (self.hold_first and handing):
                return events, handing
            held = set(handing)
            self._held.update((ev.request_id, ev) for ev in events if ev.request_id in held)
        return [ev for ev in events if ev.request_id not in held], handing

    def hand_over(self, prefill: Engine, request_id: str) -> None:
        """On the prefill lane's thread, storage lock held: the request leaves the prefill
        lane's engine into transit, and the decode lane gets an adoption command unless one is
        queued already (it takes this one too)."""
        assert self._decode is not None, "attach() first"
        with self._lock:
            self._inside.discard(request_id)
        seq = prefill.hand_over(request_id)
        self.clock.handed(request_id)
        with self._lock:
            self._transit[request_id] = seq
            self._to_adopt.append(request_id)
            if self._adopt_queued:
                return
            self._adopt_queued = True
        self._decode.submit(self._adopt_all).add_done_callback(self._adopted_all)

    # ---- the decode lane's side ----------------------------------------------------------
    def _adopt_all(self, e: Engine) -> None:
        """On the decode lane's thread, storage lock held: every request handed over since the
        last call, in order. One command a burst: each command takes the storage lock, and a
        burst of long prompts handed over by one prefill step cost the decode lane a lock wait
        each (H100, 2026-12-06: decode commands 7-16 ms p99, nearly all of it waiting)."""
        adopted = []
        for rid in self._take_to_adopt():
            try:
                self._adopt(rid, e)
            except Exception as exc:
                self._not_adopted(rid, exc)
            else:
                adopted.append(rid)
        if self.hold_first:  # before the decode lane's first step with them: FIFO outbox
            self._send_held(adopted)

    def _adopt(self, request_id: str, e: Engine) -> None:
        """Same block ids, no copy."""
        with self._lock:
            seq = self._transit.pop(request_id, None)
        if seq is None:
            return  # aborted in transit; the abort released the blocks
        try:
            continue_prefilled(
                e,
                request_id,
                seq.prompt_ids,
                seq.output_ids,
                seq.params,
                seq.block_ids,
                tenant=seq.tenant,
                priority=seq.priority,
                num_computed=seq.num_computed,
                # the one pool already holds these blocks' hashes (the prefill lane committed)
                block_hashes=seq.block_hashes,
                committed_blocks=seq.num_committed_blocks,
                arrival_time=seq.arrival_time,  # its place in the decode lane's order
            )
        except BaseException:
            if request_id not in e.seqs:
                e.pool.release(reversed(seq.block_ids))
            raise
        self.handovers += 1
        self.clock.adopted(request_id)

    def _adopted_all(self, fut: Future[None]) -> None:
        """The command did not run (the decode lane stopped): what waits for it ends."""
        exc = fut.exception()
        if exc is not None:
            for rid in self._take_to_adopt():
                self._not_adopted(rid, exc)

    def _take_to_adopt(self) -> list[str]:
        """The requests handed over since the last adoption command, which is over."""
        with self._lock:
            rids, self._to_adopt = self._to_adopt, []
            self._adopt_queued = False
        return rids

    def _not_adopted(self, request_id: str, exc: BaseException) -> None:
        """Never leave the stream hanging: it ends, aborted."""
        log.error("decode lane could not adopt %s: %r", request_id, exc)
        # a held first token goes out first: the client gets what was generated
        abort = TokenEvent(request_id, (), finish_reason=FinishReason.ABORT)
        self._send_held([request_id], [abort])

    def _send_held(self, request_ids: list[str], then: list[TokenEvent] | None = None) -> None:
        """The held first tokens of ``request_ids`` go out (in one outbox put), ``then`` after."""
        assert self._outbox is not None, "attach() first"
        with self._lock:
            held = [ev for rid in request_ids if (ev := self._held.pop(rid, None)) is not None]
        if held and self.tuner is not None:
            for ev in held:
                self.tuner.on_first_token(ev.request_id)
        if held or then:
            self._outbox.put([*held, *(then or ())])
