"""Global KV directory: block hash -> {(worker, tier)}, fed by the pools' ``KVEvent`` batches.

Pure core (no I/O); the controller applies each worker's heartbeat batch and asks ``match``.

Representation, sized for millions of blocks:

* every worker gets a small integer *slot*; slot ``s`` owns two bits of a mask,
  ``1 << 2s`` (GPU tier) and ``1 << 2s + 1`` (CPU tier);
* ``_masks: dict[block_hash, int]`` holds, per block, the OR of those bits over the workers
  that hold it (one dict, one lookup per block in ``match``); an entry is never 0;
* ``_held[slot] = (gpu_hashes, cpu_hashes)``, the reverse index;
* ``_live``: the GPU-bit position of every live slot. Removing a worker clears its bit (O(1):
  gone from ``match`` at once); ``purge`` then reclaims its entries through the reverse index,
  O(its blocks), in budgeted steps, before its slot is reused.

``match`` walks the prompt's block hashes once, keeping the mask of workers that still hold
every block so far; it stops at the first block nobody in that mask holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvrelay.workers.types import KVEvent, KVEventKind, Tier


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of a prompt's leading chain one worker holds.

    ``blocks = gpu_blocks + cpu_blocks``; a block held in both tiers counts as GPU (the
    cheaper hit). ``tokens = blocks * block_size``.
    """

    blocks: int
    gpu_blocks: int
    cpu_blocks: int
    tokens: int


class KVDirectory:
    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._masks: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}  # live workers
        self._worker_of: list[str | None] = []  # slot -> worker id (None: dead or free)
        self._held: list[tuple[set[int], set[int]]] = []  # slot -> (gpu hashes, cpu hashes)
        self._dead: list[int] = []  # removed slots whose entries are not yet purged
        self._free_slots: list[int] = []  # purged slots, ready for reuse
        self._live = 0  # GPU-bit position (1 << 2s) of every live slot s

    # -- updates ---------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        """Register a worker (``apply`` does this implicitly); no-op if known."""
        if worker_id in self._slot_of:
            return
        if self._free_slots:
            slot = min(self._free_slots)  # reuse low slots: keeps masks small
            self._free_slots.remove(slot)
            self._worker_of[slot] = worker_id
        else:
            slot = len(self._worker_of)
            self._worker_of.append(worker_id)
            self._held.append((set(), set()))
        self._slot_of[worker_id] = slot
        self._live |= 1 << (2 * slot)

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        """Apply one worker's batch, in order. Idempotent: a STORED of a held block and a
        REMOVED of an unknown block change nothing.

        The controller must not apply a batch from a worker it has already removed (a late
        heartbeat would register it again).
        """
        self.add_worker(worker_id)
        slot = self._slot_of[worker_id]
        masks = self._masks
        for ev in events:
            gpu = ev.tier is Tier.GPU
            bit = 1 << (2 * slot + (0 if gpu else 1))
            held = self._held[slot][0 if gpu else 1]
            if ev.kind is KVEventKind.STORED:
                for h in ev.block_hashes:
                    if h not in held:
                        held.add(h)
                        masks[h] = masks.get(h, 0) | bit
            else:
                for h in ev.block_hashes:
                    if h in held:
                        held.remove(h)
                        m = masks[h] & ~bit
                        if m:
                            masks[h] = m
                        else:
                            del masks[h]

    def remove_worker(self, worker_id: str) -> bool:
        """Drop a dead or drained worker: from this call on, ``match`` and ``workers`` no
        longer see it (O(1)). Its entries are reclaimed by ``purge``; returns whether it was
        known."""
        slot = self._slot_of.pop(worker_id, None)
        if slot is None:
            return False
        self._live &= ~(1 << (2 * slot))
        self._worker_of[slot] = None
        self._dead.append(slot)
        return True

    def purge(self, max_entries: int | None = None) -> int:
        """Reclaim up to ``max_entries`` (worker, tier, block) entries of removed workers
        (all when None): the controller calls it between ticks so that dropping a worker with
        a million blocks never stalls one. Returns the entries still pending."""
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        budget = -1 if max_entries is None else max_entries  # -1: unlimited
        masks = self._masks
        for slot in list(self._dead):
            for t, held in enumerate(self._held[slot]):
                keep = ~(1 << (2 * slot + t))
                while held and budget != 0:
                    h = held.pop()
                    m = masks[h] & keep
                    if m:
                        masks[h] = m
                    else:
                        del masks[h]
                    budget -= 1
            if not any(self._held[slot]):
                self._dead.remove(slot)
                self._free_slots.append(slot)
        return self.pending_purge()

    def pending_purge(self) -> int:
        return sum(len(g) + len(c) for g, c in (self._held[s] for s in self._dead))

    # -- queries ---------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int]) -> dict[str, PrefixMatch]:
        """Per worker holding at least the first block: its leading-chain length and tiers.

        Cost: one dict lookup per block up to the longest holder's chain, plus work per
        worker dropping out and per CPU-only hit.
        """
        masks = self._masks
        live = self._live
        n = len(block_hashes)
        if n == 0:
            return {}
        lengths: dict[int, int] = {}  # slot -> leading blocks
        cpu_hits: dict[int, int] = {}  # slot -> CPU-only blocks within its chain
        m = masks.get(block_hashes[0], 0)
        alive = (m | (m >> 1)) & live  # GPU-bit position of each slot holding blocks [0, i]
        i = 0
        while alive:
            cpu_only = (m >> 1) & ~m & alive  # alive slots holding block i in CPU only
            if cpu_only:
                for s in _bits(cpu_only):
                    cpu_hits[s] = cpu_hits.get(s, 0) + 1
            i += 1
            if i == n:
                for s in _bits(alive):
                    lengths[s] = n
                break
            m = masks.get(block_hashes[i], 0)
            held = (m | (m >> 1)) & live
            if held & alive != alive:
                for s in _bits(alive & ~held):
                    lengths[s] = i
                alive &= held
        out: dict[str, PrefixMatch] = {}
        bs = self.block_size
        for s, blocks in lengths.items():
            c = cpu_hits.get(s, 0)
            worker = self._worker_of[s]
            assert worker is not None  # only live slots survive the `& live` above
            out[worker] = PrefixMatch(blocks, blocks - c, c, blocks * bs)
        return out

    def workers(self) -> list[str]:
        return sorted(self._slot_of)

    def num_blocks(self) -> int:
        """Distinct block hashes held in any tier by any worker, counting removed workers'
        entries until ``purge`` reclaims them."""
        return len(self._masks)

    def worker_blocks(self, worker_id: str) -> Mapping[Tier, int]:
        slot = self._slot_of[worker_id]
        gpu, cpu = self._held[slot]
        return {Tier.GPU: len(gpu), Tier.CPU: len(cpu)}

    def check_integrity(self) -> None:
        """Every slot is exactly one of live / dead (awaiting purge) / free; the forward
        index and the per-slot reverse index agree; no empty entries; ``_live`` is exact."""
        live = 0
        for w, s in self._slot_of.items():
            if self._worker_of[s] != w:
                raise AssertionError(f"slot {s} of {w!r} names {self._worker_of[s]!r}")
            live |= 1 << (2 * s)
        if live != self._live:
            raise AssertionError("live mask disagrees with the worker table")
        states = len(self._slot_of) + len(self._dead) + len(self._free_slots)
        if states != len(self._worker_of) or len(set(self._dead) | set(self._free_slots)) != (
            len(self._dead) + len(self._free_slots)
        ):
            raise AssertionError("a slot is in more than one state, or in none")
        for s in self._dead + self._free_slots:
            if self._worker_of[s] is not None or live >> (2 * s) & 1:
                raise AssertionError(f"removed slot {s} is still named or live")
        for s in self._free_slots:
            if any(self._held[s]):
                raise AssertionError(f"free slot {s} still holds blocks")
        n_bits = 0
        for s, (gpu, cpu) in enumerate(self._held):
            for t, held in ((0, gpu), (1, cpu)):
                bit = 1 << (2 * s + t)
                for h in held:
                    if not self._masks.get(h, 0) & bit:
                        raise AssertionError(f"block {h:#x} of slot {s} tier {t} not in masks")
                n_bits += len(held)
        total = 0
        for h, m in self._masks.items():
            if m == 0:
                raise AssertionError(f"empty entry for block {h:#x}")
            total += m.bit_count()
        if total != n_bits:
            raise AssertionError(
                f"forward index has {total} (worker, tier) pairs, reverse {n_bits}"
            )


def _bits(mask: int) -> Iterable[int]:
    """Slots whose GPU-bit position (2s) is set in ``mask``."""
    while mask:
        low = mask & -mask
        yield (low.bit_length() - 1) >> 1
        mask ^= low
