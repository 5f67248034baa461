"""Continuous batching with chunked prefill under a per-step token budget.

Each ``schedule()`` returns one plan: which sequences run this step and how many of their
tokens. Running sequences come first (decodes and unfinished prefill chunks), in the policy's
order; when blocks run out, the sequence last in that order is preempted (its blocks released,
its full blocks kept as prefix cache, so recomputing it is mostly a cache hit). Waiting
sequences are admitted while the budget, ``max_num_seqs`` and the pool allow, each first
looking up its cached prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvrelay.workers.block_hash import block_hashes
from kvrelay.workers.block_pool import BlockPool
from kvrelay.workers.sequence import SeqStatus, Sequence

OrderFn = Callable[[Seq[Sequence], float], list[Sequence]]


def fcfs_order(seqs: Seq[Sequence], now: float) -> list[Sequence]:
    return sorted(seqs, key=lambda s: (s.arrival_time, s.request_id))


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
        order: OrderFn = fcfs_order,
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.hash_root = hash_root
        self.enable_prefix_caching = enable_prefix_caching
        self.order = order
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found cached

    # ---- queue -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and release its blocks (finish, abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_blocks(seq)

    def free_blocks(self, seq: Sequence) -> None:
        self.pool.release(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_committed_blocks = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = time.monotonic()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []

        queue = self.order(self.running, now)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = seq.blocks_needed(n, self.block_size)
            while not self.pool.can_allocate(need) and queue:
                victim = queue.pop()  # last in policy order
                self._preempt(victim)
                preempted.append(victim.request_id)
            if not self.pool.can_allocate(need):
                self._preempt(seq)
                preempted.append(seq.request_id)
                break
            seq.block_ids += self.pool.allocate(need)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        if not preempted:
            for seq in self.order(self.waiting, now):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                item = self._admit(seq, budget)
                if item is None:
                    break  # head of the line does not fit: keep the policy's order
                scheduled.append(item)
                budget -= item.num_tokens
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _admit(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        hits: list[int] = []
        if self.enable_prefix_caching and seq.num_computed == 0 and not seq.block_ids:
            # at least one token must be computed to get logits
            full = (seq.num_tokens - 1) // self.block_size
            if len(seq.block_hashes) < full:
                seq.block_hashes = block_hashes(seq.all_ids, self.block_size, self.hash_root)
            hits = self.pool.lookup(seq.block_hashes[:full])
        computed = len(hits) * self.block_size
        n = min(seq.num_tokens - computed, budget)
        total_blocks = -(-(computed + n) // self.block_size)
        new_blocks = total_blocks - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if not self.pool.can_allocate(new_blocks + revived):
            return None
        self.pool.acquire(hits)
        seq.block_ids = hits + self.pool.allocate(new_blocks)
        seq.num_computed = computed
        seq.num_committed_blocks = len(hits)
        if seq.num_preemptions == 0 and not seq.output_ids:
            self.prefix_queries += len(seq.prompt_ids)
            self.prefix_hits += computed
            seq.cached_prompt_tokens = computed
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SeqStatus.RUNNING
        return ScheduledSeq(seq, n)

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: blocks go back to the pool (full ones stay cached)."""
        self.running.remove(seq)
        self.free_blocks(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

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
            for b in range(seq.num_committed_blocks, full):
                self.pool.commit(seq.block_ids[b], seq.block_hashes[b])
        seq.num_committed_blocks = full
