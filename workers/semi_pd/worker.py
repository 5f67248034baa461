"""The semi-PD worker: a prefill lane and a decode lane in one process, over one KV storage.

To the controller it is one colocated worker (role ``colocated``, ``WorkerInfo.semi_pd``): the
router sends it whole requests and the PD handoff happens inside it. Everything the cluster
does with a worker keeps working unchanged, because each call lands on the lane that holds the
request: migration parks and sends from the decode lane, a pull or a handoff from elsewhere
is received into the shared pool through the decode lane, the KV directory sees the one pool's
events, the CPU tier is the one storage's. If the planner turns it into a prefill or decode
worker, ``prefill_only`` requests wait parked on the prefill lane for the controller's handoff
and the copy path runs as for any worker.

::

    submit ─▶ prefill lane (prefill_only) ─▶ first token ─▶ hand_over: block ids + references
          ─▶ transit (owned by this worker) ─▶ decode lane: add_prefilled(same block ids)

Threads and the storage lock: each lane's engine is driven only by its own loop thread; the
storage (pool, CPU tier, copier) is shared and guarded by ``storage_lock``, which a loop holds
around each step and command and releases for the forward pass (``ModelRunner.forward_guard``)
and for sampling (``Engine.sample_guard``), so one lane's forward overlaps the other's.
Check-then-act pool sequences (``can_allocate`` → ``allocate`` in ``schedule``) therefore run
whole under the lock and cannot double-allocate. With ``decode_lock_first`` the prefill lane's
scheduler gives the lock to a waiting decode lane between two admissions (each admission's
check-then-act stays whole; lanes.py, ``StorageLock``).
A lane releases a block only after the step that used it has synchronised (the guard waits for
the lane's kernels before it takes the lock back), so the other lane never reuses a block that
kernels still read. Ownership is exact: every referenced block is held by a sequence of one
lane, a request in transit, a reservation, or the decode lane's held releases
(``check_integrity``).

Overlapped decode lane (``decode_overlap``, opt-in): the decode lane runs the overlapped step
(workers/engine/engine.py: the host schedules and launches step N+1 before it reads step N's
tokens), so its guard does not synchronise, and it waits for its tokens without the lock. A
request it finishes, aborts or preempts then frees blocks that step N+1 (its discarded row's
KV write, its attention reads) may still use on the decode lane's stream, where the prefill
lane's next allocation would write them from its own stream: those releases are held
(workers/engine/deferred.py), the blocks still referenced, until the decode lane has read a
step launched after the release (on CUDA also: an event recorded at the release completed),
and all of them once the lane has nothing in flight. The trade: the host's step preparation
hides behind the device again (the colocated engine's Engine.step ran at 1.02x the graph step
overlapped, 1.24x plain, H100 batch 128; the lane's own gain is not measured yet), for blocks
that come back to the pool late (a finished request's one step after the step that finished
it, a preempted one's once the step in flight is read; a row that needs a block meanwhile
sits a step out rather than preempt another) and one CUDA event per release. The blocks a
step fills are committed (their hashes into the pool, where the other lane's prefix lookups
find them) only once that step is read (workers/engine/deferred.py, ``publish``).

Overlapped prefill lane (``prefill_overlap``, the default): the same for the prefill lane, whose
plain step leaves the GPU idle while the host schedules the next chunk, commits the last and
samples (on an H100, 2026-12-06: 3-5 ms of a 33-36 ms step at p50, under the storage lock).
It hands a request over after it read the request's first token: the step that wrote the
request's KV is done by then, and the next step (launched before that read) does not include
the request (its token was in flight).

Each lane computes in its SM share (``sm_partition.py``), switched at iteration boundaries, and
replays CUDA graphs captured in that share (``_enter``: a set per share, decode graphs on the
decode lane, prefill graphs on the prefill lane).

Events: each lane's sink runs on its loop thread (it hands requests over and feeds the split
rule) and queues the tokens on one outbox shared by both lanes, whose sender thread makes the
controller calls, as a colocated worker's does (loop.py): a lane never waits for a call, and
a controller that falls behind gets the steps of both lanes in fewer, larger calls. One FIFO
keeps a request's first token (queued by the prefill lane before it hands the request over)
ahead of its later ones (queued by the decode lane after it adopted it). ``lane_times``: where
each lane's time goes (phase_times.py), with each request's handoff in parts (``HandoffClock``).

First token (``first_token``): sent by the prefill lane as soon as it is sampled (``prefill``,
the default), or held and sent by the decode lane's adoption command (``decode``), just before
the decode lane's first step with the request (handoff.py, where the handoff's state lives).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.engine.outbox import Outbox
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.sequence import arrival_from_wall
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.kv.tiers import check_owned
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.semi_pd.handoff import InsideHandoff
from kvrelay.workers.semi_pd.lanes import (
    HandoffClock,
    StorageLock,
    forward_unlocked,
    merge_stats,
    switch_interval,
)
from kvrelay.workers.semi_pd.sm_partition import (
    GreenContextPartition,
    Lane,
    SMPartition,
    Split,
    build_partition,
)
from kvrelay.workers.semi_pd.split_rule import SplitRuleConfig
from kvrelay.workers.semi_pd.tuner import SplitTuner
from kvrelay.workers.types import SamplingParams, TokenEvent
from kvrelay.workers.worker import (
    Heartbeat,
    RequestInfo,
    Worker,
    WorkerInfo,
    request_info,
)

log = logging.getLogger(__name__)

# shares overlap (sm_partition.py): at 100 / 100 both lanes may use every SM. Measured on an
# H100 (benchmarks/README.md, 2026-12-06 20:38-21:05, stream-ordered demotion, the overlapped
# prefill lane): with the prefill lane at 75 / 90 / 100 % of the SMs goodput read 112 / 128 /
# 144 req/s where one colocated worker held 128 (TTFT ≤ 1 s, ITL ≤ 50 ms, 20 % long prompts),
# 144 in three repeats of three; with chat outputs ≥ 64 tokens 144 against 112. The price is the
# decode lane's forward: 16 ms at p99 beside full-width prefill kernels against 6 at 75 %, still
# inside a 50 ms ITL SLO; the SLO-aware rule (``split_rule``) lowers the prefill share when ITL
# nears its SLO. (Before demotion was stream-ordered, 75 / 100 was the better start: the lock
# holds, not the SMs, limited the prefill lane then.)
DEFAULT_SPLIT = Split(prefill=100, decode=100)
# the prefill lane's per-step token budget: it never decodes, so no decode ITL bounds its chunk
# as in a colocated step; 512-token chunks left its plain (non-overlapped) eager steps paying
# the host's launch work per chunk, while 4096 tokens keep the GPU busy past the launches. Not
# more: each prefill kernel holds the SMs the decode lane's kernels wait for (its ITL)
PREFILL_TOKENS = 4096
PREFILL_SIDE = {"off": "off", "decode": "off", "prefill": "prefill", "both": "prefill"}
SPLIT_STEP = 10  # percent; the split rule moves shares in these steps
FIRST_TOKEN = ("prefill", "decode")  # the lane that sends a handed over request's first token


def _capture_prefill_graphs(engine: Engine) -> None:
    """The prefill lane's up front capture: its prefill buckets only. The decode graphs its
    runner also has serve a step whose every chunk is one token, rare there and not worth a
    set of logits buffers."""
    graphs = engine.runner.prefill
    if graphs is not None and graphs.capture_graphs:
        graphs.capture_all(max_tokens=engine.config.max_num_batched_tokens)


class SemiPDWorker(Worker):
    def __init__(
        self,
        *args: Any,
        split: Split = DEFAULT_SPLIT,
        split_rule: SplitRuleConfig | None = None,
        window_s: float = 1.0,
        prefill_tokens: int = PREFILL_TOKENS,
        decode_first: bool = False,
        decode_overlap: bool = False,
        prefill_overlap: bool = True,
        first_token: str = "prefill",
        decode_lock_first: bool = False,
        **kw: Any,
    ) -> None:
        """``split_rule``: adapt the SM split to the SLOs every ``window_s`` seconds (tuner.py),
        returning to ``split`` (the rule's ``home``) once neither SLO is near; None: keep
        ``split``. ``prefill_tokens``: the prefill lane's token
        budget per step (at least the engine config's ``max_num_batched_tokens``).
        ``decode_first``: CUDA stream priorities put the decode lane's kernels ahead of the
        prefill lane's (sm_partition.py). ``decode_overlap``: the decode lane runs the
        overlapped step, its releases held until its steps are done (module docstring);
        ``prefill_overlap``: the prefill lane too. ``first_token``: which lane sends a handed
        over request's first token: ``prefill`` as soon as it is sampled, ``decode`` with the
        adoption (held until then, module docstring). ``decode_lock_first``: the prefill lane's
        scheduler hands the storage lock to the decode lane between two admissions while the
        decode lane waits for it (lanes.py, ``StorageLock``)."""
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        if first_token not in FIRST_TOKEN:
            raise ValueError(f"first_token must be one of {FIRST_TOKEN}, got {first_token!r}")
        sys.setswitchinterval(switch_interval())  # process-wide
        self._initial_split = split
        self._prefill_tokens = prefill_tokens
        self._decode_first = decode_first
        self._decode_overlap = decode_overlap
        self._prefill_overlap = prefill_overlap
        self._decode_lock_first = decode_lock_first
        self.tuner = (
            SplitTuner(replace(split_rule, home=split), window_s=window_s)
            if split_rule is not None
            else None
        )
        self.times = {lane: PhaseTimes() for lane in Lane}
        self.inside = InsideHandoff(
            HandoffClock(self.times[Lane.DECODE]),
            hold_first=first_token == "decode",
            tuner=self.tuner,
        )
        super().__init__(*args, **kw)

    def _start_engines(self, loaded: LoadedModel, config: EngineConfig, device: str) -> EngineLoop:
        # the lanes run the plain step: the storage lock's rule (a block is released only after
        # the step that used it has synchronised) holds for it, not for a step left in flight.
        # An overlapped decode lane (opt-in) holds its releases back instead (defer_releases)
        config = replace(config, overlap_schedule=False)
        # Each lane keeps a set of CUDA graphs per SM share, captured on that share's stream
        # (_enter): the capture's green context travels with the graph, where a graph captured
        # elsewhere runs on every SM whatever stream replays it (tests/gpu/test_semi_pd_gpu.py:
        # H100, 2026-12-06, a 25 % share's graph replayed at 257 TFLOP/s on any stream, one
        # captured outside at 804 on the share's). With capture_graphs the start share's set is
        # captured up front (below), and with the split rule on every share's it may move a
        # lane to (``_capture_graph_sets``); otherwise another share's buckets lazily on their
        # first step there. The decode lane's are decode graphs (their logits one buffer per
        # batch size, shared by every set: cuda_graphs.py); it prefills only a
        # request recomputed after a preemption, which runs eagerly: no prefill graphs there.
        # The storage is built here
        overlap = self._decode_overlap
        # it adopts every request handed over: sized as a decode worker's engine (Worker)
        decode = Engine(
            loaded,
            replace(
                config,
                capture_graphs=False,
                prefill_graphs=False,
                overlap_schedule=overlap,
                max_num_seqs=self._seqs_of("decode"),
            ),
            device=device,
            defer_releases=overlap,
        )
        # the prefill lane never decodes (a request moves to the decode lane after its first
        # token): sparse prefill at most there, no key bounds or page selection. Its steps
        # replay prefill graphs (prefill_graphs.py), token buckets up to its whole budget: on
        # the 1B shape an eager 1k-token step spends 6.6 ms of host time issuing its kernels,
        # the one-graph step 0.8 ms (H100, 2026-12-06: benchmarks/results/gpu_h100_s29/
        # prefill.txt), and the lanes share one GIL, so the prefill lane's launches delay the
        # decode lane's step preparation (its ITL). A set's memory grows with its largest
        # bucket (at 4096 rows about twice prefill_graphs.py's 2048-row estimate)
        sparse = replace(config.sparse, mode=PREFILL_SIDE.get(config.sparse.mode, "off"))
        budget = max(config.max_num_batched_tokens, self._prefill_tokens)
        prefill = Engine(
            loaded,
            replace(
                config,
                sparse=sparse,
                max_num_batched_tokens=budget,
                prefill_graph_tokens=budget,
                capture_graphs=False,
                overlap_schedule=self._prefill_overlap,
            ),
            device=device,
            storage=decode.storage,
            defer_releases=self._prefill_overlap,
        )
        self.storage = decode.storage
        self.storage_lock = StorageLock(decode_first=self._decode_lock_first)
        decode_lock = self.storage_lock.urgent()  # the decode lane's acquisitions
        self.partition: SMPartition = build_partition(
            decode.device, self._initial_split, SPLIT_STEP, decode_first=self._decode_first
        )
        lanes = ((prefill, Lane.PREFILL, self.storage_lock), (decode, Lane.DECODE, decode_lock))
        for e, lane, lock in lanes:
            e.times = self.times[lane]
            # sampling reads no KV: without the lock (its wait to take it back is in ``sample``)
            e.sample_guard = partial(
                forward_unlocked, lock, self.partition, synchronize=False,
                times=self.times[lane], phases=False,
            )  # fmt: skip
            e.runner.forward_guard = partial(
                forward_unlocked,
                lock,
                self.partition,
                synchronize=not e.overlap,
                times=self.times[lane],
            )
        if self._decode_lock_first:
            prefill.scheduler.yield_point = self._prefill_yield
        self.prefill_engine = prefill
        self._events = Outbox(self._emit, name=f"semi-pd-{self.worker_id}", times=self.delivery)
        # both lanes call their sinks on the loop thread, once per step: the prefill lane's
        # hands requests over on its engine after their first token went out; both tick the
        # split rule's window
        self.prefill_loop = EngineLoop(
            prefill,
            self._emit_prefill,
            name=f"prefill-{self.worker_id}",
            lock=self.storage_lock,
            sender=False,
            shared_outbox=self._events,
            times=self.times[Lane.PREFILL],
        ).start()
        loop = EngineLoop(
            decode,
            self._emit_decode,
            name=f"decode-{self.worker_id}",
            lock=decode_lock,
            sender=False,
            shared_outbox=self._events,
            times=self.times[Lane.DECODE],
        ).start()
        self._lanes = {Lane.PREFILL: self.prefill_loop, Lane.DECODE: loop}
        self.inside.attach(loop, self._events)
        self.set_split(self._initial_split)
        if config.capture_graphs:  # after each lane entered its share (commands run in order)
            self._capture_graph_sets()
        return loop

    def _capture_graph_sets(self) -> int:
        """Each lane's graphs, up front: its start share's set and, with the split rule on,
        the set of every share the rule may move it to (captured on that share's stream), not
        at the lane's first step there: those captures stalled the lanes mid-serving, 9-10
        times a rate (p50 36-51 ms, up to 83) while the rule moved (H100, 2026-12-07,
        ``graph_capture`` in the delivery times). Nearest shares first; each lane goes back
        to its start share. Returns the sets captured."""
        part = self.partition
        # the shares the rule may move a lane to (the partition's: one green context each)
        every: list[int] | None = None
        if self.tuner is not None and isinstance(part, GreenContextPartition):
            every = part.shares()
        t0, count = time.perf_counter(), 0
        lanes = (
            (Lane.DECODE, lambda e: e.capture_graphs()),
            (Lane.PREFILL, _capture_prefill_graphs),
        )
        for lane, capture in lanes:
            loop, home = self._lanes[lane], part.share(lane)
            for share in sorted(every or [home], key=lambda s: (abs(s - home), -s)):  # home 1st
                if share != home:
                    loop.call(partial(self._enter, lane, share), timeout=None)
                loop.call(capture, timeout=None)
                count += 1
            if every:
                loop.call(partial(self._enter, lane, home), timeout=None)
        if every:
            log.info("captured the graph sets of %d SM shares in %.1f s", count,
                     time.perf_counter() - t0)  # fmt: skip
        return count

    def _engines(self) -> tuple[Engine, ...]:
        return (self.prefill_loop.engine, self.loop.engine)

    def _prefill_yield(self) -> None:
        """The prefill lane's scheduler, between two admissions: the decode lane waiting for
        the storage lock gets it first (``decode_lock_first``); the time it held it is the
        prefill lane's ``yield`` (off its ``held``)."""
        t0 = time.perf_counter()
        if self.storage_lock.yield_to_urgent():
            dt = time.perf_counter() - t0
            times = self.times[Lane.PREFILL]
            times.off_lock(dt)
            times.add("yield", dt)

    # ---- SM shares -----------------------------------------------------------------------
    def set_split(self, split: Split) -> None:
        """Each lane enters its new share at its next iteration boundary (a command between
        two steps); requests in flight carry on."""
        for lane, loop in self._lanes.items():
            loop.submit(partial(self._enter, lane, split.share(lane)))

    def _enter(self, lane: Lane, share: int, engine: Engine) -> None:
        if engine.overlap and share != self.partition.share(lane):
            # the step in flight runs on the old share's stream, and the next one (on the new
            # stream) reads its tokens and its KV: nothing orders the two streams but this wait
            with GPU_GATE.work():
                self.partition.synchronize()
        self.partition.enter(lane, share)
        part, runner = self.partition, engine.runner
        if isinstance(part, GreenContextPartition):  # the share's own graphs, decode and prefill
            for graphs in (runner.graphs, runner.prefill):
                if graphs is not None:
                    graphs.use_set(share, part.stream(lane, share))

    def split(self) -> Split:
        return Split(self.partition.share(Lane.PREFILL), self.partition.share(Lane.DECODE))

    # ---- requests ------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        output_ids: Sequence[int] = (),
        tenant: str = "",
        priority: int = 0,
        prefill_only: bool = False,
        arrival_s: float = 0.0,
    ) -> None:
        """Every request prefills on the prefill lane; unless the controller asked for
        ``prefill_only`` (it hands the KV to another worker), it continues on the decode lane
        (``arrival_s`` as ``Worker.submit``'s; the decode lane keeps the arrival)."""
        arrival = arrival_from_wall(arrival_s)
        # the prompt's block hashes here, on the caller's thread: admission would compute them
        # on the prefill lane's thread with the storage lock held, which the decode lane waits
        # for (an 8k-token prompt: 511 hashes)
        hashes = self.prefill_engine.prompt_block_hashes(prompt_ids) if not output_ids else []
        if not prefill_only:
            self.inside.stays(request_id)
        if self.tuner is not None:
            self.tuner.on_submit(request_id, len(prompt_ids) + len(output_ids))
        try:
            self.prefill_loop.call(
                lambda e: e.add_request(
                    request_id,
                    prompt_ids,
                    params,
                    output_ids=output_ids,
                    tenant=tenant,
                    priority=priority,
                    prefill_only=True,
                    block_hashes=hashes,
                    arrival_time=arrival,
                )
            )
        except BaseException:
            self.inside.forget(request_id)
            if self.tuner is not None:
                self.tuner.forget(request_id)
            raise

    def abort(self, request_id: str) -> bool:
        # a request moves prefill lane -> transit -> decode lane and is looked for in that
        # order, each place on its own thread (or under the lock): it cannot slip past
        had_reservation = self.unreserve(request_id)
        found = self.prefill_loop.call(lambda e: e.abort(request_id))
        if self.tuner is not None:
            self.tuner.forget(request_id)
        with self.storage_lock:  # its blocks are owned by transit until released
            seq = self.inside.drop(request_id)
            if seq is not None:
                self.storage.pool.release(reversed(seq.block_ids))
                found = True
        return self.loop.call(lambda e: e.abort(request_id)) or found or had_reservation

    def continue_local(self, request_id: str) -> None:
        """No other worker took the handoff: the decode lane takes it, by block ids."""

        def hand_over(e: Engine) -> bool:
            if request_id not in e.handoffs:
                return False
            self.inside.hand_over(e, request_id)
            return True

        if not self.prefill_loop.call(hand_over):
            super().continue_local(request_id)  # parked on the decode lane (a migration)

    def _holder(self, request_id: str) -> EngineLoop:
        here = self.prefill_loop.call(lambda e: request_id in e.handoffs)
        return self.prefill_loop if here else self.loop

    # ---- the handoff inside --------------------------------------------------------------
    def _emit_prefill(self, events: list[TokenEvent]) -> None:
        """The prefill lane's sink (its loop thread, after a step): the first tokens are queued
        to go out (those of handed over requests held for their adoption if ``first_token`` is
        ``decode``), then the step's internal requests are handed over, under one lock hold."""
        out, handing = self.inside.first_tokens(events)
        self._events.put(out)
        if self.tuner is not None:  # a held token's TTFT ends when it goes out
            for ev in out:
                self.tuner.on_first_token(ev.request_id, ev.finish_reason is not None)
        if handing:
            with self.storage_lock:
                for rid in handing:
                    self.inside.hand_over(self.prefill_engine, rid)
        self._tick()

    def _emit_decode(self, events: list[TokenEvent]) -> None:
        """The decode lane's sink: tokens queued to go out, then the split rule's bookkeeping."""
        self._events.put(events)
        self.inside.clock.emitted(events)
        if self.tuner is None:
            return
        for ev in events:
            self.tuner.on_token(ev.request_id, ev.finish_reason is not None)
        self._tick()

    def _tick(self) -> None:
        """A window that closes may change the split, applied at the lanes' next iteration
        boundary (the split it was decided from is the one both lanes last entered)."""
        if self.tuner is None:
            return
        split = self.split()
        decision = self.tuner.tick(split, self.prefill_loop.prefill_tokens_per_s)
        if decision is not None and decision.split != split:
            log.info("semi-PD split %s -> %s: %s", split, decision.split, decision.reason)
            self.set_split(decision.split)

    def split_log(self) -> list[dict[str, Any]]:
        """The split rule's changes, oldest first (``SplitTuner.change_records``)."""
        return self.tuner.change_records() if self.tuner is not None else []

    def lane_times(self, reset: bool = False) -> dict[str, dict[str, dict[str, float]]]:
        """Per lane (``prefill``, ``decode``), per phase (loop.py, lanes.py): count, total and
        mean / p50 / p90 / p99 / max ms; ``reset``: start afresh after reading."""
        return {lane.value: t.summary(reset=reset) for lane, t in self.times.items()}

    def window_log(self) -> list[dict[str, Any]]:
        """Every window the split rule closed, oldest first (``SplitTuner.window_records``)."""
        return self.tuner.window_records() if self.tuner is not None else []

    # ---- figures -------------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        return replace(super().info(), semi_pd=True)

    def requests_info(self) -> list[RequestInfo]:
        out = {
            r.request_id: r
            for r in self.prefill_loop.call(
                lambda e: [request_info(s) for s in e.seqs.values()], settle=True
            )
        }
        out.update((rid, request_info(s)) for rid, s in self.inside.in_transit().items())
        out.update((r.request_id, r) for r in super().requests_info())
        return list(out.values())

    def heartbeat(self) -> Heartbeat:
        self.expire_reservations()
        prefill = self.prefill_loop.call(lambda e: e.stats())
        decode, events = self.loop.call(lambda e: (e.stats(), tuple(e.drain_kv_events())))
        stats = merge_stats(prefill, decode)
        split = self.split()
        stats.extra.update(
            semi_pd_handovers=self.inside.handovers,
            semi_pd_prefill_sm=split.prefill,
            semi_pd_decode_sm=split.decode,
            semi_pd_split_changes=len(self.tuner.changes) if self.tuner else 0,
            semi_pd_lock_yields=self.storage_lock.yields,
        )
        return Heartbeat(
            self.worker_id,
            self.role,
            stats,
            events,
            self.transport_totals(),
            self.loop.alive and self.prefill_loop.alive,
            self.prefill_loop.prefill_tokens_per_s,
            self.loop.decode_step_s,
        )

    def check_integrity(self) -> dict[str, int]:
        """Both lanes' invariants, and exact ownership over the one storage: every referenced
        block is held exactly as often as it is referenced, by a sequence of either lane, a
        request in transit or a reservation. Raises on a block owned twice or by nobody.
        Call it with no transfer in flight (a send pins its blocks for its duration)."""
        with self.storage_lock:
            transit = self.inside.in_transit()
            reservations = self.reservations.block_ids()
            engines = (self.prefill_engine, self.engine)
            for e in engines:
                e.check_integrity()
            seqs = [
                *(s for e in engines for s in (*e.seqs.values(), *e.handoffs.values())),
                *transit.values(),
            ]
            reserved = [b for ids in reservations for b in ids]
            held = [b for e in engines for b in e.deferred_blocks()]  # the decode lane's
            check_owned(
                self.storage.pool, [*(b for s in seqs for b in s.block_ids), *reserved, *held]
            )
            if self.storage.cpu_tier is not None:
                check_owned(self.storage.cpu_tier.pool, (b for s in seqs for b in s.cpu_block_ids))
            s = self.storage.pool.stats()
            out = {
                "total": s.total,
                "free": s.free,
                "used": s.used,
                "cached": s.cached,
                "requests": len(seqs),
                "transit": len(transit),
                "reservations": len(reservations),
                "handovers": self.inside.handovers,
                "held": len(held),
            }
            if self.storage.cpu_tier is not None:
                out["cpu_used"] = self.storage.cpu_tier.pool.stats().used
        return out

    def shutdown(self) -> None:
        self.prefill_loop.stop()
        super().shutdown()
        self._events.close(5.0)  # the events both lanes queued go out
        if not self.loop.alive:  # the decode lane's held releases go back (its thread ended)
            with self.storage_lock:
                self.engine.release_deferred()
