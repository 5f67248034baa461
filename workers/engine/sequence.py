"""A request's state inside one engine: its tokens, its blocks and how far its KV is computed.

Token and KV bookkeeping, for a sequence of ``num_tokens`` tokens (prompt + output)::

    all_ids:      p0 p1 p2 ... p(n-1) o0 o1 ... o(k-1)
    KV in cache:  [0, num_computed)            positions whose K/V are written
    to compute:   [num_computed, num_tokens)   the next chunk(s); the last one yields logits

A decoding sequence has ``num_computed == num_tokens - 1``: its newest token is fed next step.
Block ``b`` covers positions ``[b*bs, (b+1)*bs)``; it is committed with its hash once full and
computed.

The overlapped engine (``EngineConfig.overlap_schedule``) schedules step N+1 before it reads
step N's tokens: a token sampled on the device and not read yet sits in ``output_ids`` as
``PLACEHOLDER`` (always the last one), and the next step takes its input id from the device.

Preemption by swap (``workers/kv/tiers.py``) keeps ``num_computed`` and moves the KV to CPU blocks
``cpu_block_ids`` (one per device block, same order)::

    RUNNING -> SWAPPED_OUT (copy out in flight: holds both; then CPU blocks only)
            -> SWAPPING_IN (device blocks allocated, copy in flight: holds both) -> RUNNING
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvrelay.workers.types import FinishReason, SamplingParams

PLACEHOLDER = -1  # an output token still on the device (never a valid id: a leak fails loudly)
MAX_ARRIVAL_AGE_S = 24 * 3600.0  # an older wall-clock arrival is taken as this old (bad clock)


def arrival_from_wall(arrival_s: float, *, now_wall: float | None = None,
                      now: float | None = None) -> float:
    """A request's arrival on this process's monotonic clock (``Sequence.arrival_time``) from
    the wall-clock time it reached the cluster (``GenerateRequest.arrival_s``, stamped by the
    frontend): its age now, taken off the monotonic now. 0 (unknown): now. An arrival in the
    future (another host's clock ahead of ours) counts as now, and one older than a day as a day
    old, so a bad clock can reorder requests but never by more than that."""
    now = time.monotonic() if now is None else now
    if arrival_s <= 0:
        return now
    age = (time.time() if now_wall is None else now_wall) - arrival_s
    return now - min(max(age, 0.0), MAX_ARRIVAL_AGE_S)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED_OUT = "swapped_out"  # KV in CPU blocks (or being copied there)
    SWAPPING_IN = "swapping_in"  # KV being copied back; joins the batch when the copy is done
    HANDOFF = "handoff"  # prefill-only: first token sampled, blocks held for the relay
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    tenant: str = ""
    priority: int = 0
    prefill_only: bool = False  # a prefill worker's request: stop after the first token
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    cpu_block_ids: list[int] = field(default_factory=list)  # while swapped (see module doc)
    num_computed: int = 0
    num_committed_blocks: int = 0  # leading blocks whose hash was recorded
    block_hashes: list[int] = field(default_factory=list)  # hashes of the full blocks so far
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    # tokens emitted at (re)admission: outputs given at add time are not re-emitted
    num_emitted: int = 0
    # overlapped engine: the token in flight is certainly its last (length, prefill-only), so
    # the scheduler leaves it out of the next step
    last_in_flight: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def token_range(self, lo: int, hi: int) -> list[int]:
        """``all_ids[lo:hi]`` without copying the whole sequence."""
        n = len(self.prompt_ids)
        if hi <= n:
            return self.prompt_ids[lo:hi]
        if lo >= n:
            return self.output_ids[lo - n : hi - n]
        return self.prompt_ids[lo:] + self.output_ids[: hi - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def blocks_needed(self, num_new: int, block_size: int) -> int:
        """New blocks to hold KV up to ``num_computed + num_new`` tokens."""
        total = -(-(self.num_computed + num_new) // block_size)
        return max(0, total - len(self.block_ids))
