"""Continuous batching with chunked prefill under a per-step token budget, a pluggable policy,
and preemption by swap (or recompute).

Each ``schedule()`` returns one plan: which sequences run this step and how many of their
tokens. In order:

1. Copies that finished (swap out / swap in, ``workers/kv/tiers.py``) are completed.
2. The policy (``workers/engine/policy.py``) may name running victims so a more deserving waiting
   request fits (priority: a more important one; fair: a tenant far behind on its counter).
3. Running sequences (decodes and unfinished prefill chunks) in the policy's order; when
   blocks run out, the sequence last in that order is preempted, unless swap-outs still in
   flight will free the blocks: then the sequence that lacks them sits this step out.
4. Waiting sequences, in the policy's order, while the budget, ``max_num_seqs`` and the pool
   allow: a swapped-out one is swapped in (it joins the batch once its copy is done), a new or
   recomputing one first looks up its cached prefix (device, then CPU blocks promoted by copy).
5. The running sequences at the tail of the policy's order that it puts behind the waiting
   ones (``behind_waiting``: the deadline policy's prompts already past their target), with
   what budget is left; they are still the first victims in 3.

A preempted sequence is swapped to the CPU tier when that is cheaper than recomputing it
(``preemption_mode="auto"``; ``"swap"`` whenever the CPU tier has room; ``"recompute"`` never)
and otherwise releases its blocks (full ones stay cached, so recomputing is mostly a hit).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvrelay.workers.engine.deferred import DeferredReleases
from kvrelay.workers.engine.policy import FCFSPolicy, RequestView, SchedulingPolicy, order_fn
from kvrelay.workers.engine.sequence import SeqStatus, Sequence
from kvrelay.workers.engine.swap import PREEMPTION_MODES, Swapper
from kvrelay.workers.kv.block_hash import block_hashes
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import STREAM_DEMOTION, CpuTier


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the sequence, so its last position yields a token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        hash_root: int,
        enable_prefix_caching: bool = True,
        policy: SchedulingPolicy | None = None,
        tier: CpuTier | None = None,
        preemption_mode: str = "auto",
        swap_bytes_per_s: float | None = None,  # None: measured (workers/engine/swap.py)
        recompute_tokens_per_s: float = 2000.0,
        deferred: DeferredReleases | None = None,
        stream_demotion: bool = STREAM_DEMOTION,  # EngineConfig's default (KVRELAY_STREAM_DEMOTION)
    ) -> None:
        """``deferred``: device blocks are released through it, held while a step of the
        engine may still use them (an overlapped engine over a shared storage); blocks it will
        free count as spare, as a swap-out's in flight do. Full blocks' hashes are committed
        through it too, once the step that writes the blocks is done."""
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode {preemption_mode!r} not in {PREEMPTION_MODES}")
        self.pool = pool
        self.stream_demotion = stream_demotion  # demotions in ``schedule`` stream-ordered
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.hash_root = hash_root
        self.enable_prefix_caching = enable_prefix_caching
        self.policy: SchedulingPolicy = policy if policy is not None else FCFSPolicy()
        self.order = order_fn(self.policy, self.view)
        self.tier = tier
        self.deferred = deferred
        self._release = deferred.release if deferred is not None else pool.release
        self.swapper = (
            Swapper(tier, mode=preemption_mode, bytes_per_s=swap_bytes_per_s,
                    tokens_per_s=recompute_tokens_per_s, release_device=self._release)
            if tier is not None else None
        )
        self.waiting: list[Sequence] = []  # new, recomputing and swapped-out (copy done)
        self.running: list[Sequence] = []  # swaps in flight live in ``swapper.in_flight``
        # (running list, its order) of the last step: reused while the list is the same
        self._order_memo: tuple[list[Sequence], list[Sequence]] | None = None
        # the last plan when it only decoded (one token a row) and preempted nobody: returned
        # again, not rebuilt, while the same sequences decode in the same order and none needs
        # a block (``_plan``)
        self._steady: tuple[ScheduledSeq, ...] | None = None
        self.steady_plans = 0  # plans returned that way, for tests and benchmarks
        self.num_preemptions = 0
        self.recompute_preemptions = 0
        self.copy_waits = 0  # schedules that waited for a copy: nothing else could run
        self.deferred_rows = 0  # running sequences that sat a step out for a swap-out's blocks
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached (either tier)
        self.prefix_hits_cpu = 0  # of which served from the CPU tier
        # called before each admission of a waiting sequence: an engine whose pool another
        # engine shares under a lock may hand the lock over there (workers/semi_pd/lanes.py,
        # ``StorageLock.yield_to_urgent``); each admission checks the pool afresh
        self.yield_point: Callable[[], object] | None = None

    def set_max_num_seqs(self, cap: int) -> None:
        """The running-sequence cap from the next step on (a worker's role switch). Running
        sequences past a lowered cap are not preempted: no new one is admitted until they
        fall below it."""
        if cap < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {cap}")
        self.max_num_seqs = cap

    def view(self, seq: Sequence) -> RequestView:
        running = seq.status is SeqStatus.RUNNING
        if running:
            blocks = len(seq.block_ids)
        elif seq.status is SeqStatus.SWAPPED_OUT:
            blocks = len(seq.cpu_block_ids)
        else:
            blocks = -(-seq.num_tokens // self.block_size)
        return RequestView(
            seq.request_id, seq.tenant, seq.priority, seq.arrival_time, len(seq.prompt_ids),
            min(seq.num_computed, len(seq.prompt_ids)), len(seq.output_ids), blocks, running,
        )

    # ---- queue -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def swaps_out(self) -> int:
        return self.swapper.swaps_out if self.swapper else 0

    @property
    def swaps_in(self) -> int:
        return self.swapper.swaps_in if self.swapper else 0

    def in_flight(self) -> list[Sequence]:
        return [s for s, _ in self.swapper.in_flight.values()] if self.swapper else []

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finish, abort)."""
        if self.swapper and seq.request_id in self.swapper.in_flight:
            self._requeue(self.swapper.land(seq.request_id))
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """The sequence is done (finished, aborted, or handed off): out of every queue, its
        blocks released (full ones stay as prefix cache)."""
        if seq.status is SeqStatus.HANDOFF:
            self.free_blocks(seq)  # parked: in no queue
        else:
            self.remove(seq)
        seq.status = SeqStatus.FINISHED

    def is_running(self, seq: Sequence) -> bool:
        return seq in self.running

    def park(self, seq: Sequence) -> None:
        """A running sequence stops, holding its blocks, until ``resume`` or ``finish``
        (a prefill-only request waiting for its handoff; a request leaving by migration)."""
        self.running.remove(seq)
        seq.status = SeqStatus.HANDOFF

    def resume(self, seq: Sequence) -> None:
        """A parked sequence runs again here (no decode worker took its handoff)."""
        assert seq.status is SeqStatus.HANDOFF, seq.status
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def adopt(self, seq: Sequence) -> None:
        """A sequence whose KV was written into its blocks elsewhere (a handoff or migration
        received) joins the running batch; the caller commits its computed tokens."""
        self.running.append(seq)
        seq.status = SeqStatus.RUNNING

    def free_blocks(self, seq: Sequence) -> None:
        self._release(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_committed_blocks = 0
        if seq.cpu_block_ids:
            assert self.tier is not None
            self.tier.pool.release(reversed(seq.cpu_block_ids))
            seq.cpu_block_ids = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or (self.swapper and self.swapper.in_flight))

    # ---- planning ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.tier is None or not self.stream_demotion:
            return self._schedule()
        # every block this plan allocates is next written by this engine's own stream
        # (its step, a promotion, a swap-in copy that waits for it): demotions need not wait
        with self.tier.stream_ordered():
            return self._schedule()

    def _schedule(self) -> SchedulerOutput:
        self.poll()
        out = self._plan()
        if not out.scheduled and self.swapper and self.swapper.in_flight:
            # nothing can run until a copy lands: wait for the oldest rather than spin
            self.copy_waits += 1
            self._requeue(self.swapper.land(next(iter(self.swapper.in_flight))))
            self.poll()
            again = self._plan()
            out = SchedulerOutput(again.scheduled, out.preempted + again.preempted)
        return out

    def poll(self) -> None:
        """Requeue the sequences whose swap copies are done."""
        if self.swapper is not None:
            for seq in self.swapper.landed():
                self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """A landed swap: a swap-in runs again, a swap-out waits in CPU blocks."""
        if seq.status is SeqStatus.SWAPPING_IN:
            seq.status = SeqStatus.RUNNING
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).append(seq)

    def _plan(self) -> SchedulerOutput:
        now = time.monotonic()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []

        # a sequence whose last token is in flight (overlapped engine) is done: not run again,
        # not a victim; it leaves when the engine reads that token
        runnable = [s for s in self.running if not s.last_in_flight]
        if self.waiting and runnable:
            freeing = self._freeing()
            victims = self.policy.preempt_victims(
                [self.view(s) for s in runnable], [self.view(s) for s in self.waiting],
                now, self.pool.num_available + freeing,
            )
            by_id = {s.request_id: s for s in runnable}
            for rid in victims:
                if rid in by_id:
                    self._preempt(by_id[rid])
                    preempted.append(rid)
                    runnable.remove(by_id[rid])

        ordered = self._order_running(runnable, now)
        steady, self._steady = self._steady, None
        bs = self.block_size
        if (
            steady is not None
            and not self.waiting
            and len(steady) == len(ordered) <= budget
            and all(
                it.seq is s
                and len(s.prompt_ids) + len(s.output_ids) == s.num_computed + 1
                and s.num_computed < len(s.block_ids) * bs
                for it, s in zip(steady, ordered, strict=True)
            )
        ):  # the same decode batch, no block needed: what the loop below would plan
            self._steady = steady
            self.steady_plans += 1
            return SchedulerOutput(steady, ())
        queue = deque(ordered)
        # the tail of the order the policy serves after the waiting ones are admitted (the
        # deadline policy's late prompts); still the first victims when blocks run out
        behind: deque[Sequence] = deque()
        while self.waiting and queue and self.policy.behind_waiting(self.view(queue[-1]), now):
            behind.appendleft(queue.pop())
        starved = False  # a running sequence lacked blocks: admit nobody this step
        claimed = 0  # of the blocks ``_spare`` counts, those deferred sequences wait for

        def grow_running(queue: deque[Sequence], tail: deque[Sequence]) -> None:
            nonlocal budget, starved, claimed
            while queue and budget > 0:
                seq = queue.popleft()
                item = self._grow(seq, budget)
                while (
                    item is None
                    and (queue or tail)
                    and self._new_blocks(seq, budget) > self._spare() - claimed
                ):
                    victim = tail.pop() if tail else queue.pop()  # last in policy order
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    starved = True
                    item = self._grow(seq, budget)
                need = self._new_blocks(seq, budget) if item is None else 0
                if item is None and need <= self._spare() - claimed:
                    # a victim's copy in flight will free the blocks it lacks: it sits this
                    # step out, neither preempting another request nor stalling the batch on
                    # the copy (an asynchronous swap-out holds its device blocks until the copy
                    # lands; preempting on until the pool had room swapped several requests
                    # out a step: 271 swaps on an H100 where 16 make the room)
                    claimed += need
                    self.deferred_rows += 1
                    starved = True
                    continue
                if item is None:
                    self._preempt(seq)
                    preempted.append(seq.request_id)
                    starved = True
                    break
                scheduled.append(item)
                budget -= item.num_tokens

        grow_running(queue, behind)
        if not starved:
            for seq in self.order(self.waiting, now):
                busy = len(self.running) + (self.swapper.num_swapping_in() if self.swapper else 0)
                if budget <= 0 or busy >= self.max_num_seqs:
                    break
                if self.yield_point is not None:
                    self.yield_point()
                if seq.status is SeqStatus.SWAPPED_OUT:
                    # room for it and a block of growth for every sequence running or landing
                    # (``busy``): without that headroom the next step preempts one of them,
                    # and asynchronous swaps thrash (measured: 26 swaps per request)
                    if not self._swap_in(seq, headroom=busy):
                        break
                    landed = self._grow(seq, budget) if seq.status is SeqStatus.RUNNING else None
                    if landed is not None:
                        scheduled.append(landed)
                        budget -= landed.num_tokens
                    continue
                item = self._admit(seq, budget)
                if item is None:
                    break  # head of the line does not fit: keep the policy's order
                scheduled.append(item)
                budget -= item.num_tokens
            grow_running(behind, deque())
        plan = tuple(scheduled)
        if not preempted and all(it.num_tokens == 1 for it in plan):
            self._steady = plan
        return SchedulerOutput(plan, tuple(preempted))

    def _order_running(self, runnable: list[Sequence], now: float) -> list[Sequence]:
        """The policy's order of the running sequences. A ``static_order`` policy is asked
        again only when the list changed: a batch that only decodes costs no RequestViews
        (nor, for a ``static_once_started`` one, a batch whose requests all have their first
        token: 256 views and a sort cost ~0.5 ms a step on a CPU core)."""
        policy = self.policy
        if not policy.static_order and not (
            policy.static_once_started and all(s.output_ids for s in runnable)
        ):
            return self.order(runnable, now)
        memo = self._order_memo
        if memo is None or len(memo[0]) != len(runnable) or any(
            a is not b for a, b in zip(memo[0], runnable, strict=True)
        ):
            memo = self._order_memo = (runnable, self.order(runnable, now))
        return memo[1]

    def _grow(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        """Schedule a running sequence's next chunk, allocating its blocks, or None."""
        # ``num_tokens`` and ``blocks_needed`` inline: this runs for every row of every step
        computed = seq.num_computed
        n = min(len(seq.prompt_ids) + len(seq.output_ids) - computed, budget)
        need = -(-(computed + n) // self.block_size) - len(seq.block_ids)
        if need > 0:  # most decode steps fit the last block: no pool call
            if not self.pool.can_allocate(need):
                return None
            seq.block_ids += self.pool.allocate(need)
        return ScheduledSeq(seq, n)

    def _new_blocks(self, seq: Sequence, budget: int) -> int:
        """Blocks a running sequence's next chunk needs beyond those it holds (``_grow``)."""
        n = min(seq.num_tokens - seq.num_computed, budget)
        return -(-(seq.num_computed + n) // self.block_size) - len(seq.block_ids)

    def _spare(self) -> int:
        """Device blocks allocatable now or soon (``_freeing``)."""
        return self.pool.num_available + self._freeing()

    def _freeing(self) -> int:
        """Device blocks not allocatable yet that will be: swap-outs in flight, and releases
        held while a step runs (``deferred``)."""
        freeing = self.swapper.freeing_blocks() if self.swapper else 0
        return freeing + (self.deferred.freeing() if self.deferred is not None else 0)

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        hits: list[int] = []
        cpu: list[int] = []
        if self.enable_prefix_caching and seq.num_computed == 0 and not seq.block_ids:
            # at least one token must be computed to get logits
            full = (seq.num_tokens - 1) // self.block_size
            if len(seq.block_hashes) < full:
                # the full blocks before the last token only: that token may still be on the
                # device (overlapped engine; a placeholder here)
                seq.block_hashes = block_hashes(
                    seq.token_range(0, full * self.block_size), self.block_size, self.hash_root
                )
            hits = self.pool.lookup(seq.block_hashes[:full])
            if self.tier is not None:
                cpu = self.tier.cpu_hits(seq.block_hashes[len(hits) : full])
        computed = (len(hits) + len(cpu)) * self.block_size
        n = min(seq.num_tokens - computed, budget)
        total_blocks = -(-(computed + n) // self.block_size)
        new_blocks = total_blocks - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if not self.pool.can_allocate(new_blocks + revived):
            return None
        self.pool.acquire(hits)
        if cpu:
            assert self.tier is not None
            self.tier.pool.acquire(cpu)  # a demotion during the allocation must not evict them
        fresh = self.pool.allocate(new_blocks)
        if cpu:
            assert self.tier is not None
            lo = len(hits)
            self.tier.promote(cpu, fresh[: len(cpu)], seq.block_hashes[lo : lo + len(cpu)])
            self.tier.pool.release(reversed(cpu))
        seq.block_ids = hits + fresh
        seq.num_computed = computed
        seq.num_committed_blocks = len(hits) + len(cpu)
        if seq.num_preemptions == 0 and not seq.output_ids:
            self.prefix_queries += len(seq.prompt_ids)
            self.prefix_hits += computed
            self.prefix_hits_cpu += len(cpu) * self.block_size
            seq.cached_prompt_tokens = computed
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SeqStatus.RUNNING
        return ScheduledSeq(seq, n)

    # ---- preemption ------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self._swap_out(seq):
            return
        # recompute: blocks go back to the pool (full ones stay cached)
        self.free_blocks(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self.recompute_preemptions += 1

    def _swap_out(self, seq: Sequence) -> bool:
        if self.swapper is None or not self.swapper.swap_out(seq, len(self.running)):
            return False
        seq.status = SeqStatus.SWAPPED_OUT
        self.poll()  # a synchronous copy has landed already
        return True

    def _swap_in(self, seq: Sequence, headroom: int = 0) -> bool:
        if self.swapper is None or not self.swapper.swap_in(seq, headroom):
            return False
        seq.status = SeqStatus.SWAPPING_IN
        self.waiting.remove(seq)
        self.poll()
        return True

    # ---- after the forward pass ----------------------------------------------------------------
    def commit_computed(self, item: ScheduledSeq) -> None:
        """Advance ``num_computed`` and record the hashes of blocks that became full."""
        seq = item.seq
        seq.num_computed += item.num_tokens
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed_blocks:
            return
        if len(seq.block_hashes) < full:
            start = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else self.hash_root
            seq.block_hashes += block_hashes(
                seq.all_ids[: full * self.block_size], self.block_size, parent, start
            )
        if self.enable_prefix_caching:
            lo = seq.num_committed_blocks
            ids, hashes = seq.block_ids[lo:full], seq.block_hashes[lo:full]
            if self.deferred is not None:  # once the step writing them is done (deferred.py)
                self.deferred.commit(seq, lo, ids, hashes)
            else:
                self.pool.commit_many(ids, hashes)
        seq.num_committed_blocks = full

    def check_integrity(self) -> None:
        """One queue per sequence; statuses agree with queues and with the blocks held."""
        queued = [*self.running, *self.waiting, *self.in_flight()]
        if len({id(s) for s in queued}) != len(queued):
            raise AssertionError("a sequence is in two scheduler queues")
        for s in self.running:
            if s.status is not SeqStatus.RUNNING or s.cpu_block_ids:
                raise AssertionError(f"running {s.request_id} is {s.status} / holds CPU blocks")
        for s in self.waiting:
            if s.status is SeqStatus.SWAPPED_OUT and (s.block_ids or not s.cpu_block_ids):
                raise AssertionError(f"swapped-out {s.request_id} holds device blocks")
            if s.status is SeqStatus.WAITING and s.cpu_block_ids:
                raise AssertionError(f"waiting {s.request_id} holds CPU blocks")
            if s.status not in (SeqStatus.WAITING, SeqStatus.SWAPPED_OUT):
                raise AssertionError(f"waiting {s.request_id} is {s.status}")
        for s in self.in_flight():
            if s.status not in (SeqStatus.SWAPPED_OUT, SeqStatus.SWAPPING_IN):
                raise AssertionError(f"{s.request_id} in flight is {s.status}")
