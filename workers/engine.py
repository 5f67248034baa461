"""The worker engine: ``step()`` = schedule → run model → sample → emit.

One engine owns one model, one KV cache tensor and the block pool over it. It is driven by one
thread (``workers/loop.py`` runs it for served workers); nothing here is thread-safe.

Disaggregation hooks: a request added with ``prefill_only`` stops after its first token and is
parked in HANDOFF with its blocks held until ``finish_handoff``; a decode engine ``reserve``s
blocks, receives KV into them, and continues the request with ``add_prefilled``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from kvrelay.workers.block_hash import namespace_hash
from kvrelay.workers.block_pool import BlockPool
from kvrelay.workers.loader import LoadedModel
from kvrelay.workers.model import kv_cache_shape
from kvrelay.workers.runner import ModelRunner
from kvrelay.workers.sampler import Sampler, SampleRow
from kvrelay.workers.scheduler import ScheduledSeq, Scheduler
from kvrelay.workers.sequence import SeqStatus, Sequence
from kvrelay.workers.types import FinishReason, PoolStats, SamplingParams, TokenEvent


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_gb holds
    kv_cache_gb: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunk size)
    enable_prefix_caching: bool = True
    seed: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    pool: PoolStats
    running: int
    waiting: int
    handoff: int
    prompt_tokens_computed: int
    decode_tokens_computed: int
    preemptions: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    steps: int
    extra: dict[str, float] = field(default_factory=dict)


class Engine:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), *, device: str = "cpu"
    ) -> None:
        self.loaded = loaded
        self.config = config
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)
        dtype = next(loaded.model.parameters()).dtype
        bs = config.block_size
        per_block = kv_cache_shape(loaded.config, 1, bs)
        block_bytes = torch.Size(per_block).numel() * dtype.itemsize
        num_blocks = config.num_blocks or max(16, int(config.kv_cache_gb * 2**30 // block_bytes))
        self.block_bytes = block_bytes
        self.kv_cache = torch.zeros(
            kv_cache_shape(loaded.config, num_blocks, bs), dtype=dtype, device=self.device
        )
        self.pool = BlockPool(num_blocks, bs)
        self.scheduler = Scheduler(
            self.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            hash_root=namespace_hash(loaded.model_id),
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.runner = ModelRunner(loaded.model, self.kv_cache, bs)
        self.sampler = Sampler(seed=config.seed)
        self.max_context = loaded.config.max_context
        self.eos_ids = frozenset(loaded.config.eos_token_ids) | frozenset(
            getattr(loaded.tokenizer, "eos_token_ids", ()) or ()
        )
        self.seqs: dict[str, Sequence] = {}
        self.handoffs: dict[str, Sequence] = {}
        self.prompt_tokens_computed = 0
        self.decode_tokens_computed = 0
        self.steps = 0
        self.idle = True  # the last step had nothing it could schedule

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
    ) -> None:
        """Queue a request. ``output_ids`` resumes one that already produced tokens elsewhere
        (recompute after a migration or a crash); they are not emitted again."""
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
            tenant=tenant,
            priority=priority,
            prefill_only=prefill_only,
        )
        seq.num_emitted = len(output_ids)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None) or self.handoffs.pop(request_id, None)
        if seq is None:
            return False
        if seq.status is SeqStatus.HANDOFF:
            self.scheduler.free_blocks(seq)
        else:
            self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        self.idle = not plan.scheduled
        if self.idle:
            return []
        self.steps += 1
        logits, inputs = self.runner.run(plan.scheduled)
        for item in plan.scheduled:
            seq = item.seq
            lo, hi = seq.num_computed, seq.num_computed + item.num_tokens
            prompt_part = max(0, min(hi, len(seq.prompt_ids)) - lo)
            self.prompt_tokens_computed += prompt_part
            self.decode_tokens_computed += item.num_tokens - prompt_part
            self.scheduler.commit_computed(item)
        if not inputs.sampled:
            return []
        rows = [
            SampleRow(
                it.seq.params,
                it.seq.num_tokens,
                it.seq.all_ids if it.seq.params.repetition_penalty != 1.0 else (),
            )
            for it in inputs.sampled
        ]
        tokens = self.sampler.sample(logits, rows).tolist()
        return [self._append(it.seq, tok) for it, tok in zip(inputs.sampled, tokens, strict=True)]

    def _append(self, seq: Sequence, token: int) -> TokenEvent:
        seq.output_ids.append(token)
        params = seq.params
        reason: FinishReason | None = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_context:
            reason = FinishReason.LENGTH
        cached = seq.cached_prompt_tokens if seq.num_emitted == 0 else 0
        seq.num_emitted = len(seq.output_ids)
        if reason is not None:
            self._finish(seq, reason)
        elif seq.prefill_only:
            self.scheduler.running.remove(seq)
            seq.status = SeqStatus.HANDOFF
            del self.seqs[seq.request_id]
            self.handoffs[seq.request_id] = seq
        return TokenEvent(seq.request_id, (token,), finish_reason=reason, cached_prompt_tokens=cached)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self.seqs[seq.request_id]

    # ---- disaggregation ------------------------------------------------------------------
    def handoff_blocks(self, request_id: str) -> list[int]:
        """Blocks holding the prompt's KV of a parked prefill-only request."""
        seq = self.handoffs[request_id]
        return seq.block_ids[: -(-seq.num_computed // self.config.block_size)]

    def finish_handoff(self, request_id: str) -> None:
        """The decode side has the KV: release the blocks (full ones stay as prefix cache)."""
        seq = self.handoffs.pop(request_id)
        self.scheduler.free_blocks(seq)
        seq.status = SeqStatus.FINISHED

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
    ) -> None:
        """Continue a request whose prompt KV was written into reserved ``block_ids``."""
        seq = Sequence(
            request_id, list(prompt_ids), params, output_ids=list(output_ids),
            tenant=tenant, priority=priority,
        )
        seq.block_ids = list(block_ids)
        seq.num_emitted = len(output_ids)
        self.seqs[request_id] = seq
        self.scheduler.running.append(seq)
        seq.status = SeqStatus.RUNNING
        self.scheduler.commit_computed(ScheduledSeq(seq, len(prompt_ids)))

    # ---- figures -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
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
        )

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held = Counter(
            b for s in (*self.seqs.values(), *self.handoffs.values()) for b in s.block_ids
        )
        for block, count in held.items():
            if self.pool.ref_count(block) < count:
                raise AssertionError(f"block {block} held more often than referenced")
