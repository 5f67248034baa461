"""Device blocks an overlapped engine gave up while its kernels may still use them.

An engine that shares its KV storage with another engine computing on another stream (the
semi-PD decode lane, workers/semi_pd/worker.py) must not hand a block back to the pool while
a step of its own that reads or writes the block may still run: the other engine could
allocate it and write into it meanwhile. With the overlapped step that happens every step: a
request finishes when the host reads step N's tokens, step N+1 (with that request's discarded
row, its KV write included) already launched; an abort or a preemption lands between launches.

So such an engine releases through ``DeferredReleases``: a release is held, the blocks keep
the reference they had (not free, not evictable, still found by a prefix lookup: a full
block is only read), until its ``Fence`` is done: the engine has read a step launched no
earlier than the release (it synchronised on it), and on CUDA an event recorded on the lane's
stream at the release has completed (it covers copies queued outside a step too). The engine
releases everything held once nothing of it is left in flight (``reclaim(wait=True)``).
Held blocks are owned by the holder for ``check_integrity`` (``blocks``).

Commits wait the same way (``commit``): a block that became full in step N+1 is committed with
its hash right after the launch, before its KV is written, and a hash in the pool is what a
prefix lookup on the other lane (its admission, a recompute after a preemption) or a prefix
send to another worker would read. So the hashes go into the pool only once the fence taken
at the commit is done (``publish``), and only if the sequence still holds those blocks: one
that finished, was preempted or swapped out meanwhile released them, and they stay unhashed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kvrelay.workers.engine.sequence import SeqStatus, Sequence
from kvrelay.workers.kv.block_pool import BlockPool


@dataclass(frozen=True, slots=True)
class Fence:
    """What a release waits for."""

    step: int  # the engine's last launched step when the blocks were released
    event: torch.cuda.Event | None  # recorded then on the lane's stream; None on CPU

    def done(self, completed: int) -> bool:
        """``completed``: the last step the engine has read (all before it are done too)."""
        return completed >= self.step and (self.event is None or self.event.query())


class DeferredReleases:
    def __init__(self, pool: BlockPool, fence: Callable[[], Fence | None]) -> None:
        """``fence``: the engine's fence for a release made now; None: nothing of the engine
        can still use the blocks, they go back at once."""
        self.pool = pool
        self._fence = fence
        self._held: deque[tuple[Fence, list[int]]] = deque()  # fences in launch order
        # commits waiting for their step: (fence, sequence, first block index, ids, hashes)
        self._commits: deque[tuple[Fence, Sequence, int, list[int], list[int]]] = deque()
        self.held_total = 0  # blocks ever held back (stats: overlap_held_blocks)
        self.held_commits = 0  # blocks whose commit ever waited for a step

    def __bool__(self) -> bool:
        return bool(self._held) or bool(self._commits)

    def commit(self, seq: Sequence, first: int, block_ids: list[int], hashes: list[int]) -> None:
        """``BlockPool.commit_many(block_ids, hashes)`` for blocks ``first...`` of ``seq``, once
        the step that writes them is done (``publish``); at once if none is in flight."""
        if not block_ids:
            return
        fence = self._fence()
        if fence is None:
            self.pool.commit_many(block_ids, hashes)
            return
        self._commits.append((fence, seq, first, block_ids, hashes))
        self.held_commits += len(block_ids)

    def publish(self, completed: int, *, wait: bool = False) -> int:
        """Commit, oldest first, what waits behind fences done by ``completed`` (``wait``: all,
        after their events), for sequences that still hold the blocks. Returns the blocks
        whose hashes went to the pool (or were already there under another block)."""
        n = 0
        while self._commits:
            fence, seq, first, ids, hashes = self._commits[0]
            if wait:
                if fence.event is not None:
                    fence.event.synchronize()
            elif not fence.done(completed):
                break
            self._commits.popleft()
            if (
                seq.status is not SeqStatus.FINISHED
                and seq.block_ids[first : first + len(ids)] == ids
            ):
                self.pool.commit_many(ids, hashes)
                n += len(ids)
        return n

    def release(self, block_ids: Iterable[int]) -> None:
        """``BlockPool.release`` for the engine's blocks (tail first, as there)."""
        blocks = list(block_ids)
        if not blocks:
            return
        fence = self._fence()
        if fence is None:
            self.pool.release(blocks)
            return
        self._held.append((fence, blocks))
        self.held_total += len(blocks)

    def reclaim(self, completed: int, *, wait: bool = False) -> int:
        """Release, oldest first, what is held behind fences that are done by ``completed``;
        ``wait``: nothing of the engine is left in flight, so everything (on CUDA after its
        event; commits waiting for the same steps go in first, ``publish``). Returns the
        blocks released."""
        self.publish(completed, wait=wait)
        n = 0
        while self._held:
            fence, blocks = self._held[0]
            if wait:
                if fence.event is not None:
                    fence.event.synchronize()
            elif not fence.done(completed):
                break  # later fences are later on the stream
            self._held.popleft()
            self.pool.release(blocks)
            n += len(blocks)
        return n

    def blocks(self) -> list[int]:
        """Every held block, once per reference held."""
        return [b for _, blocks in self._held for b in blocks]

    def freeing(self) -> int:
        """Blocks that become allocatable once everything held is released: those whose every
        reference is held here (a prefix block another request also holds stays used)."""
        if not self._held:
            return 0
        held = Counter(self.blocks())
        return sum(1 for b, n in held.items() if self.pool.ref_count(b) == n)
