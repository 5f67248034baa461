"""The CPU tier's bookkeeping (workers/kv/tiers.py) on host memory: the order of a copy's
block pairs, and the LRU order demoted blocks enter the CPU pool in."""

from __future__ import annotations

import torch

from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import build_cpu_tier, host_order


def test_a_copy_between_device_and_host_runs_in_host_block_order() -> None:
    device = torch.empty(0, device="meta")  # any device but the host's
    host = torch.empty(0)
    src, dst = [7, 3, 9, 1], [13, 12, 11, 10]  # a descending run: four copies unsorted
    down = host_order(device, src, host, dst)
    assert down == ([1, 9, 3, 7], [10, 11, 12, 13])  # the same pairs, host ids going up
    up = host_order(host, dst, device, src)
    assert up == ([10, 11, 12, 13], [1, 9, 3, 7])
    assert host_order(host, dst, host, src) == (dst, src)  # one device: left as it is


def test_demoted_blocks_keep_the_prefix_longer_than_the_tail() -> None:
    """A request's blocks leave the device tail first (released tail first, evicted oldest
    first); in the CPU pool too its tail goes first, so what stays is a prefix a later request
    can still promote."""
    cache = torch.zeros(4, 1, 2, 16, 1, 4)
    pool = BlockPool(4, 16)
    _, tier = build_cpu_tier(cache, pool, num_blocks=4, kv_gb=0.0, async_copies=False)
    assert tier is not None
    head_to_tail = pool.allocate(4)
    pool.commit_many(head_to_tail, [100, 101, 102, 103])
    pool.release(reversed(head_to_tail))  # as the scheduler frees a finished request
    pool.release(reversed(pool.allocate(4)))  # evicts all four: demoted, the CPU pool full
    assert tier.cpu_hits([100, 101, 102, 103]) == tier.pool.lookup([100, 101, 102, 103])
    assert len(tier.cpu_hits([100, 101, 102, 103])) == 4
    other = pool.allocate(1)
    pool.commit(other[0], 200)
    pool.release(other)
    pool.release(pool.allocate(4))  # evicts block 200's: its demotion evicts one CPU block
    assert len(tier.cpu_hits([200])) == 1
    assert len(tier.cpu_hits([100, 101, 102, 103])) == 3  # the tail went, not the head
