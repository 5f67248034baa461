"""The swap-or-recompute rule and the copy rate it learns (workers/engine/swap.py, rates.py), and
the block runs the cross-device copy moves (kernels/reference.py): pure logic, plus a Swapper
over real CPU pools whose copy rate follows the copies it makes."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.reference import block_runs
from kvrelay.workers.engine.rates import copy_rate, running_average
from kvrelay.workers.engine.sequence import SeqStatus, Sequence
from kvrelay.workers.engine.swap import PROBE_BLOCKS, Swapper, prefer_swap
from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import BlockCopier, CpuTier
from kvrelay.workers.types import SamplingParams

MB = 1 << 20


def test_rule_weighs_the_round_trip_against_the_prefill() -> None:
    tokens, tps = 2000, 10_000.0  # recompute: 0.2 s
    assert prefer_swap(10 * MB, tokens, 1e9, tps)  # 20 ms both ways
    assert not prefer_swap(10 * MB, tokens, 1e8, tps)  # 0.21 s
    # the round trip counts twice: a copy rate that moves the bytes once in the recompute time
    # is not enough
    once = 10 * MB / (tokens / tps)
    assert not prefer_swap(10 * MB, tokens, once, tps)
    assert prefer_swap(10 * MB, tokens, 2 * once, tps)


def test_an_overlapped_copy_is_weighed_against_the_batch_a_prefill_delays() -> None:
    """A round trip of 40 ms against a 20 ms prefill: inline, both stall the batch and
    recompute wins; overlapped with compute, the copy delays its victim only while the
    prefill delays the 7 other running requests too, and swap wins."""
    nbytes, tokens, tps, rate = 20 * MB, 2000, 100_000.0, 20 * MB / 0.02
    assert not prefer_swap(nbytes, tokens, rate, tps)
    assert not prefer_swap(nbytes, tokens, rate, tps, delayed=1)
    assert prefer_swap(nbytes, tokens, rate, tps, delayed=8)


def test_a_slow_measured_copy_turns_the_rule_to_recompute() -> None:
    """The issue's case: an 8 GB/s prior picks swap; copies measured at 0.3 GB/s (a pageable
    bounce and a host gather) move the rate until recompute wins, within a few swaps."""
    nbytes, tokens, tps = 25 * MB, 2048, 40_000.0
    rate = 8e9
    assert prefer_swap(nbytes, tokens, rate, tps)
    swaps = 0
    while prefer_swap(nbytes, tokens, rate, tps):
        observed = copy_rate(nbytes, nbytes / 0.3e9)
        assert observed is not None
        rate = running_average(rate, observed)
        swaps += 1
    assert 1 <= swaps <= 15  # the average gives a new copy 0.2: ~11 swaps here, not hundreds
    assert copy_rate(0, 1.0) is None and copy_rate(MB, 0.0) is None


def test_block_runs_group_consecutive_pairs() -> None:
    assert block_runs([], []) == []
    src, dst = [4, 5, 6, 9, 10, 11], [0, 1, 2, 3, 7, 8]
    runs = block_runs(src, dst)
    # every pair is covered once, in order, and a run never breaks a consecutive pair
    flat = [(s + i, d + i) for s, d, k in runs for i in range(k)]
    assert flat == list(zip(src, dst, strict=True))
    assert runs == [(4, 0, 3), (9, 3, 1), (10, 7, 2)]
    with pytest.raises(ValueError):
        block_runs([1, 2], [3])


def _tier(device_blocks: int = 16, cpu_blocks: int = 16) -> CpuTier:
    cache = torch.randn(device_blocks, 2, 2, 4, 2, 8)  # [n, L, 2, bs, Hkv, D]
    pool = BlockPool(device_blocks, 4)
    return CpuTier(cache, pool, cpu_blocks, BlockCopier(torch.device("cpu"), async_copies=False))


def test_swapper_probes_then_follows_its_copies() -> None:
    tier = _tier()
    tier.cache.normal_()
    before = tier.cache.clone()
    probed = Swapper(tier, mode="auto", bytes_per_s=None, tokens_per_s=1e-6)
    assert probed.measure_copies and probed.bytes_per_s > 0
    assert torch.equal(tier.cache, before)  # the probe writes scratch buffers only
    assert PROBE_BLOCKS <= 16
    fixed = Swapper(_tier(), mode="auto", bytes_per_s=8e9, tokens_per_s=1e-6)
    assert not fixed.measure_copies and fixed.bytes_per_s == 8e9

    for sw in (probed, fixed):
        seq = Sequence("a", list(range(10)), SamplingParams())
        seq.block_ids = sw.tier.device_pool.allocate(3)
        seq.num_computed = 10
        prior = sw.bytes_per_s
        assert sw.swap_out(seq)  # recompute is absurdly slow: swap
        seq.status = SeqStatus.SWAPPED_OUT
        plan = sw.in_flight["a"][1]
        seconds = plan.handle.wait()
        assert plan.nbytes == 3 * sw.tier.block_bytes and seconds > 0
        sw.land("a")
        observed = copy_rate(plan.nbytes, seconds)
        assert observed is not None
        want = running_average(prior, observed) if sw is probed else prior
        assert sw.bytes_per_s == pytest.approx(want)
        sw.tier.pool.release(reversed(seq.cpu_block_ids))
        sw.tier.pool.check_integrity()
        sw.tier.device_pool.check_integrity()
