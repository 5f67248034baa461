"""The worker engine: ``step()`` = schedule → run model → sample → emit.

One engine owns one model, one KV cache tensor and the block pool over it. It is driven by one
thread (``workers/engine/loop.py`` runs it for served workers); nothing here is thread-safe.

Disaggregation hooks: a request added with ``prefill_only`` stops after its first token and is
parked in HANDOFF with its blocks held until ``finish_handoff``; a decode engine ``reserve``s
blocks, receives KV into them, and continues the request with ``add_prefilled``.

Overlap (``overlap_schedule``, SGLang's overlap scheduler / vLLM's async scheduling): one
``step()`` schedules and launches step N+1 *before* it reads step N's tokens, so on CUDA the host
prepares the next batch while the device computes::

    step() call k:   schedule N+1 | launch N+1 (inputs: N's tokens, on the device) |
                     read N (the one sync) -> stop checks, events of N |
                     commit N+1, sample N+1 (left on the device, copy to host queued)

The host learns a token one call later. Outputs are those of the plain path: step N+1's rows
of sequences that step N finished (a stop token) are computed but thrown away before sampling
(their KV slot lies in a block the finish released), so no extra token is emitted and the
sampler draws for exactly the rows the plain path draws for. A sequence whose in-flight token
is certainly its last (``max_tokens``, context, prefill-only) is not scheduled again at all.
Anything that reads a sequence's tokens from outside ``step()`` (park, migration) calls
``settle()`` first, which reads the step in flight and returns its events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

from kvrelay.workers.device_upload import host_to_device
from kvrelay.workers.engine.config import EngineConfig, EngineStats
from kvrelay.workers.engine.cuda_graphs import BATCH_SIZES
from kvrelay.workers.engine.deferred import DeferredReleases, Fence
from kvrelay.workers.engine.inflight import InFlight
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.policy import make_policy
from kvrelay.workers.engine.rates import prefill_rate, running_average
from kvrelay.workers.engine.runner import ModelRunner
from kvrelay.workers.engine.sampler import Sampler, SampleRow
from kvrelay.workers.engine.scheduler import ScheduledSeq, Scheduler
from kvrelay.workers.engine.sequence import PLACEHOLDER, SeqStatus, Sequence
from kvrelay.workers.kv.block_hash import block_hashes, namespace_hash
from kvrelay.workers.kv.storage import KVStorage, build_kv_storage
from kvrelay.workers.kv.tiers import check_held
from kvrelay.workers.model.llama import kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.model.sparse_attention import bounds_bytes, build_sparse
from kvrelay.workers.types import FinishReason, KVEvent, SamplingParams, TokenEvent

_T = TypeVar("_T")


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        *,
        device: str = "cpu",
        storage: KVStorage | None = None,
        defer_releases: bool = False,
    ) -> None:
        """``storage``: KV memory shared with another engine (the semi-PD worker's lanes;
        its caller serialises pool calls); None: this engine builds its own from ``config``.
        ``defer_releases``: with the overlapped step, blocks this engine releases while a
        step of it may still use them are held until that step is done (``deferred.py``): an
        engine on another stream shares the storage."""
        self.loaded = loaded
        self.config = config
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        bs = config.block_size
        if storage is None:
            block_shape = kv_cache_shape(loaded.config, 1, bs)[1:]
            dtype = next(loaded.model.parameters()).dtype
            block_bytes = torch.Size(block_shape).numel() * dtype.itemsize
            storage = build_kv_storage(
                block_shape, dtype, self.device, num_blocks=config.num_blocks,
                kv_gb=config.kv_cache_gb, cpu_num_blocks=config.cpu_num_blocks,
                cpu_kv_gb=config.cpu_kv_gb, async_copies=config.async_swaps,
                side_bytes_per_block=bounds_bytes(config.sparse, block_bytes),  # key bounds
            )  # fmt: skip
        self.storage = storage
        self.block_bytes = storage.block_bytes
        self.kv_cache = storage.cache
        self.pool = storage.pool
        self.copier, self.cpu_tier = storage.copier, storage.cpu_tier
        self._measured_tps = config.recompute_tokens_per_s is None
        self.sparse = build_sparse(config.sparse, loaded, self.kv_cache)
        overlap = config.overlap_schedule
        self.overlap = (self.device.type == "cuda" if overlap is None else overlap) and (
            self.sparse is None
        )
        self._in_flight: InFlight | None = None
        self._completed = 0  # the last step whose tokens were read (all before it are done)
        self.deferred = (
            DeferredReleases(self.pool, self._fence) if defer_releases and self.overlap else None
        )
        self.steps = 0
        self.scheduler = Scheduler(
            self.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            hash_root=namespace_hash(loaded.model_id),
            enable_prefix_caching=config.enable_prefix_caching,
            policy=make_policy(config.policy, config.ttft_slo_s),
            tier=self.cpu_tier,
            preemption_mode=config.preemption_mode,
            swap_bytes_per_s=None if config.swap_gb_per_s is None else config.swap_gb_per_s * 1e9,
            recompute_tokens_per_s=config.recompute_tokens_per_s or 2000.0,
            deferred=self.deferred,
            stream_demotion=config.stream_demotion,
        )
        # decode graphs for every batch the scheduler admits (an engine allowed more than
        # the largest default bucket's 128 sequences ran those steps eagerly)
        self.runner = ModelRunner(
            loaded.model, self.kv_cache, bs, sparse=self.sparse,
            use_prefill_graphs=config.prefill_graphs, max_prefill_seqs=config.max_num_seqs,
            max_prefill_tokens=config.prefill_graph_tokens,
            max_graph_batch=max(
                BATCH_SIZES[-1], config.max_num_seqs, config.decode_graph_batch
            ),
        )  # fmt: skip
        self.sampler = Sampler(seed=config.seed)
        self._last_read = 0.0  # when the last in-flight step was read (its device time ends)
        self.discarded_tokens = 0  # overlapped rows of sequences that had finished
        self.max_context = loaded.config.max_context
        # a sequence ends ("length") when it holds every block of the pool: it could not grow,
        # and preempting it would only bring it back to the same wall
        self.max_seq_tokens = min(self.max_context, self.pool.num_blocks * bs)
        self.eos_ids = frozenset(loaded.config.eos_token_ids) | frozenset(
            getattr(loaded.tokenizer, "eos_token_ids", ()) or ()
        )
        self.seqs: dict[str, Sequence] = {}
        self.handoffs: dict[str, Sequence] = {}
        self.prompt_tokens_computed = 0
        self.decode_tokens_computed = 0
        self.idle = True  # the last step had nothing it could schedule
        # where a plain step's host time goes (``schedule``, ``commit``, ``sample``: the
        # sampler's kernels and the tokens' copy to the host); None: not recorded
        self.times: PhaseTimes | None = None
        # entered around sampling (its kernels, its pinned uploads, the tokens' copy): it
        # reads no KV, and a semi-PD lane gives the storage lock back meanwhile
        # (workers/semi_pd/). Suspected of the overlapped prefill lane's long lock holds
        # (H100, 2026-12-06 14:14); with it the holds stayed (16:21, benchmarks/README.md):
        # sampling was not their cause
        self.sample_guard: Callable[[], AbstractContextManager[object]] = nullcontext
        if config.capture_graphs:
            self.capture_graphs()

    def capture_graphs(self) -> int:
        """Capture every decode graph and prefill bucket a step of this engine can use, now
        (``capture_graphs``); the number of decode graphs and prefill buckets captured (0
        without graphs: CPU, or off). Decode batches go up to ``decode_graph_batch`` when that
        is larger: a worker that may switch to decode captures its decode role's graphs at
        start, not at their first step after the switch."""
        runner = self.runner
        config = self.config
        n = 0
        if runner.graphs is not None:
            n += runner.graphs.capture_all(
                max_batch=max(config.max_num_seqs, config.decode_graph_batch)
            )
        if runner.prefill is not None and runner.prefill.capture_graphs:
            n += runner.prefill.capture_all(max_tokens=config.max_num_batched_tokens)
        return n

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        output_ids: Seq[int] = (),
        tenant: str = "",
        priority: int = 0,
        prefill_only: bool = False,
        block_hashes: Seq[int] = (),
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. ``output_ids`` resumes one that already produced tokens elsewhere
        (recompute after a migration or a crash); they are not emitted again.
        ``arrival_time``: when it reached the cluster, on ``time.monotonic``'s clock
        (``arrival_from_wall``), so that a request moved here keeps its place in the policy's
        order; None: now.
        ``block_hashes``: ``prompt_block_hashes(prompt_ids)``, computed by the caller on its own
        thread (a semi-PD worker's submit: off the storage lock), so that admission does not
        hash the prompt; only for a request without ``output_ids``."""
        if request_id in self.seqs or request_id in self.handoffs:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_ids:
            raise ValueError("empty prompt")
        need = -(-(len(prompt_ids) + len(output_ids) + 1) // self.config.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"prompt needs {need} KV blocks; this worker's pool has {self.pool.num_blocks}"
            )
        if len(prompt_ids) + len(output_ids) >= self.max_context:
            raise ValueError(
                f"prompt of {len(prompt_ids) + len(output_ids)} tokens does not fit the "
                f"model's context of {self.max_context}"
            )
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            output_ids=list(output_ids),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            tenant=tenant,
            priority=priority,
            prefill_only=prefill_only,
        )
        if block_hashes:
            full = (len(prompt_ids) - 1) // self.config.block_size
            if output_ids or len(block_hashes) != full:
                raise ValueError("block_hashes: the prompt's own, for a request without outputs")
            seq.block_hashes = list(block_hashes)
        seq.num_emitted = len(output_ids)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def prompt_block_hashes(self, prompt_ids: Seq[int]) -> list[int]:
        """The hashes admission gives a new prompt's full blocks (all but its last token's):
        safe to call from any thread (the scheduler's hash root and block size are fixed)."""
        bs = self.config.block_size
        full = (len(prompt_ids) - 1) // bs
        return block_hashes(prompt_ids[: full * bs], bs, self.scheduler.hash_root)

    def abort(self, request_id: str) -> bool:
        """Drop a request; a token of it still in flight is never emitted."""
        seq = self.seqs.pop(request_id, None) or self.handoffs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None or bool(self.deferred)

    # ---- the loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        if self.overlap:
            return self._step_overlapped()
        times = self.times
        ts, cs = time.perf_counter(), time.thread_time()
        plan = self.scheduler.schedule()
        self.idle = not plan.scheduled
        if self.idle:
            return []
        self.steps += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        logits, inputs = self.runner.run(plan.scheduled)
        t1, c1 = time.perf_counter(), time.thread_time()
        self._commit(plan.scheduled)
        t2, c2 = time.perf_counter(), time.thread_time()
        self._measure(plan.num_tokens, t2 - t0)
        if times is not None:
            times.add("schedule", t0 - ts, c0 - cs)
            times.add("commit", t2 - t1, c2 - c1)
        if not inputs.sampled:
            return []
        seqs = [it.seq for it in inputs.sampled]
        with self.sample_guard():  # a semi-PD lane samples without the storage lock
            tokens = self.sampler.sample(logits, self._sample_rows(seqs)).tolist()
        if times is not None:
            times.add("sample", time.perf_counter() - t2, time.thread_time() - c2)
        events = []
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.output_ids.append(tok)
            events.append(self._appended(seq, tok))
        return events

    def _step_overlapped(self) -> list[TokenEvent]:
        events = self._step_overlapped_inner()
        self._timed("reclaim", self._reclaim)
        return events

    def _step_overlapped_inner(self) -> list[TokenEvent]:
        plan = self._timed("schedule", self.scheduler.schedule)
        prev, self._in_flight = self._in_flight, None
        self.idle = not plan.scheduled and prev is None
        launched = None
        if plan.scheduled:
            self.steps += 1
            t0 = time.perf_counter()
            launched = self.runner.run(plan.scheduled, prev.device_tokens() if prev else None)
        events = self._read(prev) if prev is not None else []
        if launched is None:
            return events
        logits, inputs = launched
        # rows of sequences that step N finished (or parked) are thrown away here; in a steady
        # decode batch none did, and the plan's rows are used as they are
        running = SeqStatus.RUNNING
        live: Seq[ScheduledSeq] = plan.scheduled
        sampled = inputs.sampled
        if not all(it.seq.status is running for it in live):
            live = [it for it in live if it.seq.status is running]
            self.discarded_tokens += plan.num_tokens - sum(it.num_tokens for it in live)
            rows = [i for i, it in enumerate(sampled) if it.seq.status is running]
            if len(rows) < len(sampled):
                if not rows:
                    self._timed("commit", self._commit, live)
                    self._unsampled(plan.num_tokens, t0)
                    return events
                logits = logits.index_select(0, host_to_device(rows, torch.int64, logits.device))
                sampled = tuple(sampled[i] for i in rows)
        self._timed("commit", self._commit, live)
        if not sampled:
            self._unsampled(plan.num_tokens, t0)
            return events
        seqs = [it.seq for it in sampled]
        num_tokens = sum(it.num_tokens for it in live)
        with self.sample_guard():  # a semi-PD lane samples without the storage lock
            tokens = self.sampler.sample(logits, self._sample_rows(seqs))
            in_flight = InFlight(seqs, tokens, num_tokens, t0, self.steps)
        cap = self.max_seq_tokens
        for seq in seqs:
            out = seq.output_ids
            out.append(PLACEHOLDER)
            seq.last_in_flight = seq.prefill_only or (
                len(out) >= seq.params.max_tokens or len(seq.prompt_ids) + len(out) >= cap
            )
        self._in_flight = in_flight
        return events

    def _timed(self, phase: str, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)``, its time recorded as ``phase`` when ``times`` is set (the overlapped
        step's parts; the plain step stamps its own)."""
        if self.times is None:
            return fn(*args)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*args)
        self.times.add(phase, time.perf_counter() - t0, time.thread_time() - c0)
        return out

    def _unsampled(self, num_tokens: int, t0: float) -> None:
        """A launched step that samples nothing (a prompt's middle chunks) is read like any
        other when this engine holds releases or commits back (``deferred``): the next step
        waits for it without the storage lock. Otherwise it is never read (the next one's
        read covers it)."""
        if self.deferred is not None:
            none = torch.empty(0, dtype=torch.int64, device=self.device)
            self._in_flight = InFlight([], none, num_tokens, t0, self.steps)

    def _read(self, step: InFlight) -> list[TokenEvent]:
        """The host learns an in-flight step's tokens: placeholders replaced, stop checks."""
        with self.runner.forward_guard():  # a semi-PD lane waits without the storage lock
            tokens = step.read()
        self._completed = step.step
        if self.deferred:  # the step's full blocks, written now: their hashes go to the pool
            self.deferred.publish(self._completed)
        now = time.perf_counter()
        self._measure(step.num_tokens, now - max(step.t0, self._last_read))
        self._last_read = now
        events = []
        finished = SeqStatus.FINISHED
        for seq, tok in zip(step.seqs, tokens, strict=True):
            if seq.status is finished:
                continue  # aborted while its token was in flight
            out = seq.output_ids
            assert out[-1] == PLACEHOLDER, seq.request_id
            out[-1] = tok
            seq.last_in_flight = False
            events.append(self._appended(seq, tok))
        return events

    def settle(self) -> list[TokenEvent]:
        """Read the step in flight, if any: afterwards every sequence's tokens are known, as
        after a plain step. Returns that step's events (the caller emits them)."""
        step, self._in_flight = self._in_flight, None
        events = self._read(step) if step is not None else []
        self._reclaim()
        return events

    def _fence(self) -> Fence | None:
        """What a block this engine releases now waits for (``DeferredReleases``); None: no
        step of it can still use the block, which goes back at once."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()  # on the lane's stream: after everything it queued so far
        if self._in_flight is None and self._completed >= self.steps:  # every step read
            if event is not None:
                event.synchronize()  # a copy queued since (a swap-out's), if any
            return None
        return Fence(self.steps, event)

    def _reclaim(self) -> None:
        """Give the pool back the held blocks whose steps are done; all of them once no step
        is left in flight (a launched step that sampled nothing is never read: on CUDA the
        releases' events are waited for)."""
        idle = self._in_flight is None
        if idle:
            self._completed = self.steps
        if self.deferred:
            self.deferred.reclaim(self._completed, wait=idle)

    def release_deferred(self) -> None:
        """Give back every held block now, after the work that may use them (shutdown)."""
        self._completed = self.steps
        if self.deferred:
            self.deferred.reclaim(self.steps, wait=True)

    def deferred_blocks(self) -> list[int]:
        """Device blocks released but held back while a step may use them (owned here)."""
        return self.deferred.blocks() if self.deferred is not None else []

    def _commit(self, items: Seq[ScheduledSeq]) -> None:
        scheduler = self.scheduler
        on_served, commit = scheduler.policy.on_served, scheduler.commit_computed
        prompt_total = decode_total = 0
        for item in items:
            seq, n = item.seq, item.num_tokens
            lo = seq.num_computed
            prompt_part = max(0, min(lo + n, len(seq.prompt_ids)) - lo)
            prompt_total += prompt_part
            decode_total += n - prompt_part
            on_served(seq.tenant, prompt_part, n - prompt_part)
            commit(item)
        self.prompt_tokens_computed += prompt_total
        self.decode_tokens_computed += decode_total

    @staticmethod
    def _sample_rows(seqs: Seq[Sequence]) -> list[SampleRow]:
        return [
            SampleRow(p, len(seq.prompt_ids) + len(seq.output_ids))  # ``num_tokens``
            if (p := seq.params).repetition_penalty == 1.0
            else SampleRow(p, seq.num_tokens, seq.all_ids)
            for seq in seqs
        ]

    def _measure(self, tokens: int, seconds: float) -> None:
        """Recompute cost for the swap-or-recompute rule: prefill throughput of big steps
        (an exponential average; decode-sized steps say little about prefill speed)."""
        sw = self.scheduler.swapper
        rate = prefill_rate(tokens, seconds)
        if sw is None or not self._measured_tps or rate is None:
            return
        sw.tokens_per_s = running_average(sw.tokens_per_s, rate)

    def _appended(self, seq: Sequence, token: int) -> TokenEvent:
        """``token``, just made the last of ``seq.output_ids``: stop checks, its event."""
        out, params = seq.output_ids, seq.params
        reason: FinishReason | None = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = FinishReason.STOP
        elif (
            len(out) >= params.max_tokens
            or len(seq.prompt_ids) + len(out) >= self.max_seq_tokens  # ``num_tokens``
        ):
            reason = FinishReason.LENGTH
        cached = seq.cached_prompt_tokens if seq.num_emitted == 0 else 0
        seq.num_emitted = len(out)
        if reason is not None:
            self._finish(seq, reason)
        elif seq.prefill_only:
            self.scheduler.park(seq)
            del self.seqs[seq.request_id]
            self.handoffs[seq.request_id] = seq
        return TokenEvent(seq.request_id, (token,), "", reason, cached)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        del self.seqs[seq.request_id]

    # ---- disaggregation ------------------------------------------------------------------
    def handoff_blocks(self, request_id: str) -> list[int]:
        """Blocks holding the prompt's KV of a parked prefill-only request."""
        seq = self.handoffs[request_id]
        return seq.block_ids[: -(-seq.num_computed // self.config.block_size)]

    def finish_handoff(self, request_id: str) -> None:
        """The decode side has the KV: release the blocks (full ones stay as prefix cache)."""
        self.scheduler.finish(self.handoffs.pop(request_id))

    def hand_over(self, request_id: str) -> Sequence:
        """A parked request leaves this engine with its prompt blocks still referenced, for an
        engine over the same storage to adopt (``add_prefilled``): ownership of block ids
        moves, no byte does. Returns the sequence; its ``block_ids`` are exactly the blocks
        handed over (any beyond the computed tokens are released here), its
        ``num_committed_blocks`` those of them whose hashes the pool holds."""
        blocks = self.handoff_blocks(request_id)
        seq = self.handoffs.pop(request_id)
        committed = min(seq.num_committed_blocks, len(blocks))  # still referenced, still hashed
        seq.block_ids = seq.block_ids[len(blocks) :]
        self.scheduler.finish(seq)  # releases only the blocks past the computed tokens
        seq.block_ids = blocks
        seq.num_committed_blocks = committed
        return seq

    def reserve(self, num_blocks: int) -> list[int] | None:
        if not self.pool.can_allocate(num_blocks):
            return None
        return self.pool.allocate(num_blocks)

    def unreserve(self, block_ids: Seq[int]) -> None:
        self.pool.release(reversed(list(block_ids)))

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        output_ids: Seq[int],
        params: SamplingParams,
        block_ids: Seq[int],
        *,
        tenant: str = "",
        priority: int = 0,
        block_hashes: Seq[int] = (),
        committed_blocks: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Continue a request whose prompt KV was written into reserved ``block_ids``
        (``arrival_time`` as ``add_request``'s).
        ``block_hashes`` / ``committed_blocks``: the hashes of its leading full blocks and how
        many of those blocks are already committed in this engine's pool (an engine over the
        same storage handed them over, ``hand_over``): they are not hashed or committed again
        (an 8k-token prompt's 512 blocks cost the adopting thread milliseconds)."""
        seq = Sequence(
            request_id, list(prompt_ids), params, output_ids=list(output_ids),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            tenant=tenant, priority=priority,
        )
        seq.block_ids = list(block_ids)
        if committed_blocks:
            seq.block_hashes = list(block_hashes[: len(seq.block_ids)])
            seq.num_committed_blocks = min(committed_blocks, len(seq.block_hashes))
        seq.num_emitted = len(output_ids)
        self.seqs[request_id] = seq
        self.scheduler.adopt(seq)
        self.scheduler.commit_computed(ScheduledSeq(seq, len(prompt_ids)))

    # ---- figures -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        sw = s.swapper
        return EngineStats(
            pool=self.pool.stats(),
            running=len(s.running),
            waiting=len(s.waiting),
            handoff=len(self.handoffs),
            prompt_tokens_computed=self.prompt_tokens_computed,
            decode_tokens_computed=self.decode_tokens_computed,
            preemptions=s.num_preemptions,
            prefix_query_tokens=s.prefix_queries,
            prefix_hit_tokens=s.prefix_hits,
            steps=self.steps,
            extra={
                **(self.cpu_tier.stats_extra() if self.cpu_tier else {}),
                **(self.sparse.stats_extra() if self.sparse else {}),
                "swap_copies": self.copier.copies,
                "recompute_tokens_per_s": sw.tokens_per_s if sw else 0.0,
                "swap_bytes_per_s": sw.bytes_per_s if sw else 0.0,
                "swap_copy_waits": s.copy_waits,
                "swap_deferred_rows": s.deferred_rows,
                "overlap_discarded_tokens": self.discarded_tokens,
                # blocks whose release waited for a step in flight (``defer_releases``)
                "overlap_held_blocks": d.held_total if (d := self.deferred) is not None else 0,
                "overlap_held_commits": d.held_commits if d is not None else 0,
            },
            cpu_pool=self.cpu_tier.pool.stats() if self.cpu_tier else None,
            prefix_hit_tokens_cpu=s.prefix_hits_cpu,
            swaps_out=s.swaps_out,
            swaps_in=s.swaps_in,
            swap_bytes=sw.swap_bytes if sw else 0,
            recompute_preemptions=s.recompute_preemptions,
        )

    def drain_kv_events(self) -> list[KVEvent]:
        """Both tiers' KVEvents since the last call, in the order they happened (for the
        heartbeat; ``pool.drain_events()`` drains the same shared log)."""
        return self.pool.drain_events()

    def clear_prefix_cache(self) -> None:
        """Forget every cached (unreferenced) block in both tiers."""
        self.pool.clear_cache()
        if self.cpu_tier is not None:
            self.cpu_tier.pool.clear_cache()

    def close(self) -> None:
        """Give back held blocks (the step in flight waited for), then stop the swap thread
        (in-flight copies finish first)."""
        self.release_deferred()
        self.copier.close()

    def check_integrity(self) -> None:
        """Both pools' invariants; every block a request holds is referenced at least as often
        as it is held; queues and statuses agree."""
        self.pool.check_integrity()
        seqs = (*self.seqs.values(), *self.handoffs.values())
        check_held(self.pool, [*(b for s in seqs for b in s.block_ids), *self.deferred_blocks()])
        cpu_held = [b for s in seqs for b in s.cpu_block_ids]
        if self.cpu_tier is not None:
            self.cpu_tier.pool.check_integrity()
            check_held(self.cpu_tier.pool, cpu_held)
        elif cpu_held:
            raise AssertionError("CPU blocks held without a CPU tier")
        self.scheduler.check_integrity()
