"""Bookkeeping of one tier's KV blocks: ids, reference counts, hashes, LRU of cached blocks.

The pool never touches KV memory; it hands out block ids into a cache tensor laid out as in
``kernels/reference.py``. Every block is in exactly one state::

    free    ref == 0, no hash            (in _free)
    used    ref >= 1                     (hash optional: a full block is committed with one)
    cached  ref == 0, hash, LRU order    (in _cached; reusable by a prefix hit or evictable)

``allocate`` takes free blocks first, then evicts the least recently used cached blocks
(emitting REMOVED, and passing them to ``on_evict`` first so a tier below can keep a copy).
Check, then act: ``can_allocate(n)`` answers before ``allocate(n)``, which never half-succeeds.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from kvrelay.workers.types import KVEvent, KVEventKind, PoolStats, Tier


class PoolError(RuntimeError):
    """A caller broke the pool's contract (double free, unknown block, over-allocation)."""


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        tier: Tier = Tier.GPU,
        on_evict: Callable[[list[tuple[int, int]]], None] | None = None,
        events: list[KVEvent] | None = None,
    ) -> None:
        """``events``: the log this pool appends its KVEvents to; pools of one engine's tiers
        share one, so a tier move reads in order (REMOVED here, STORED there, or the reverse)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive: {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tier = tier
        self.on_evict = on_evict
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._events: list[KVEvent] = [] if events is None else events
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def event_log(self) -> list[KVEvent]:
        """The list this pool appends its events to; another tier's pool may share it, so one
        ``drain_events`` returns both tiers' events in order."""
        return self._events

    @property
    def num_available(self) -> int:
        """Blocks an ``allocate`` can hand out now (free + evictable cached)."""
        return len(self._free) + len(self._cached)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Block ids holding the longest leading run of ``hashes`` (takes no reference)."""
        out: list[int] = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def stats(self) -> PoolStats:
        cached = len(self._cached)
        free = len(self._free)
        return PoolStats(
            total=self.num_blocks,
            free=free,
            used=self.num_blocks - free - cached,
            cached=cached,
            extra={"evictions": self.evictions},
        )

    # ---- mutations -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise PoolError(f"cannot allocate {n} blocks: {self.num_available} available")
        take_free = min(n, len(self._free))
        out = [self._free.popleft() for _ in range(take_free)]
        evicted: list[tuple[int, int]] = []
        for _ in range(n - take_free):
            block, _ = self._cached.popitem(last=False)
            h = self._hash[block]
            assert h is not None
            evicted.append((block, h))
            del self._by_hash[h]
            self._hash[block] = None
            out.append(block)
        if evicted:
            self.evictions += len(evicted)
            if self.on_evict is not None:
                self.on_evict(evicted)
            self._events.append(
                KVEvent(KVEventKind.REMOVED, self.tier, tuple(h for _, h in evicted))
            )
        for block in out:
            self._ref[block] = 1
        return out

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take a reference on blocks found by ``lookup`` (a cached block becomes used)."""
        for block in block_ids:
            if self._ref[block] == 0:
                if block not in self._cached:
                    raise PoolError(f"block {block} is free, not cached: cannot acquire")
                del self._cached[block]
            self._ref[block] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block. Pass a request's blocks tail first: blocks released
        later are evicted later, so shared prefixes outlive their tails."""
        for block in block_ids:
            if self._ref[block] <= 0:
                raise PoolError(f"block {block} released more often than acquired")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is not None:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def commit(self, block_id: int, block_hash: int) -> bool:
        """Record that a used block now holds the full block ``block_hash``. Returns False when
        another block already holds that hash (this one then stays unhashed and is freed on
        release, so each hash has one owner)."""
        self.commit_many((block_id,), (block_hash,))
        return self._hash[block_id] == block_hash

    def commit_many(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """``commit`` of each pair in order, the hashes newly stored as one STORED event: a
        step's newly full blocks (a 4096-token prefill step commits 256; one call each was
        half the host time a semi-PD prefill step holds the storage lock for). A block whose
        hash another block already holds stays unhashed."""
        if len(block_ids) != len(block_hashes):
            raise PoolError(f"{len(block_ids)} blocks but {len(block_hashes)} hashes")
        ref, owner, by_hash = self._ref, self._hash, self._by_hash
        stored: list[int] = []
        try:
            for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
                if ref[block_id] <= 0:
                    raise PoolError(f"commit of unreferenced block {block_id}")
                current = owner[block_id]
                if current is not None:
                    if current != block_hash:
                        raise PoolError(f"block {block_id} already holds another hash")
                    continue
                if block_hash in by_hash:
                    continue  # another block holds it: this one stays unhashed
                owner[block_id] = block_hash
                by_hash[block_hash] = block_id
                stored.append(block_hash)
        finally:  # what was stored before an error is logged, as ``commit`` calls would have
            if stored:
                self._events.append(KVEvent(KVEventKind.STORED, self.tier, tuple(stored)))

    def drop(self, block_ids: Iterable[int]) -> None:
        """Forget the hashes of cached blocks and free them (e.g. after a tier move out)."""
        removed = []
        for block in block_ids:
            if block not in self._cached:
                raise PoolError(f"block {block} is not cached: cannot drop")
            del self._cached[block]
            h = self._hash[block]
            assert h is not None
            del self._by_hash[h]
            self._hash[block] = None
            self._free.append(block)
            removed.append(h)
        if removed:
            self._events.append(KVEvent(KVEventKind.REMOVED, self.tier, tuple(removed)))

    def clear_cache(self) -> None:
        """Evict every cached block (hashes forgotten, REMOVED emitted)."""
        self.drop(list(self._cached))

    def drain_events(self) -> list[KVEvent]:
        """Take the events logged so far (every tier's, when the log is shared), oldest first."""
        events = list(self._events)
        self._events.clear()  # in place: the log may be shared with another tier's pool
        return events

    # ---- invariants ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """free + used + cached == total; refs >= 0; one state and one owner per block."""
        free = set(self._free)
        cached = set(self._cached)
        if len(free) != len(self._free):
            raise PoolError("a block is twice in the free list")
        if free & cached:
            raise PoolError(f"blocks both free and cached: {sorted(free & cached)[:8]}")
        for block in range(self.num_blocks):
            ref, h = self._ref[block], self._hash[block]
            if ref < 0:
                raise PoolError(f"block {block} has ref {ref}")
            if ref > 0 and (block in free or block in cached):
                raise PoolError(f"used block {block} is also free or cached")
            if ref == 0 and block not in free and block not in cached:
                raise PoolError(f"unreferenced block {block} is neither free nor cached")
            if block in free and h is not None:
                raise PoolError(f"free block {block} still has a hash")
            if block in cached and h is None:
                raise PoolError(f"cached block {block} has no hash")
            if h is not None and self._by_hash.get(h) != block:
                raise PoolError(f"hash of block {block} is owned by another block")
        if len(self._by_hash) != sum(h is not None for h in self._hash):
            raise PoolError("hash index and block hashes disagree")
