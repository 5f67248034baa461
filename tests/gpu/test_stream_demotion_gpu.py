"""Stream-ordered demotion (``CpuTier.stream_ordered``, on unless ``KVRELAY_STREAM_DEMOTION=0``):
the device-to-host copy of evicted blocks is queued behind the step still running, the host
goes on, and every later reader or writer of those blocks — the engine's next step overwriting
the device block on the same stream, a promotion on another stream — sees the demoted data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import build_cpu_tier
from kvrelay.workers.model.loader import load_model
from kvrelay_testing.tiers import rotating_stem_prompts, run_demoting

pytestmark = pytest.mark.gpu


def test_a_stream_ordered_demotion_does_not_wait_and_its_readers_see_the_data() -> None:
    cache = torch.randn(8, 2, 2, 16, 2, 64, device="cuda")
    pool = BlockPool(8, 16)
    copier, tier = build_cpu_tier(cache, pool, num_blocks=8, kv_gb=0.0, async_copies=True)
    assert tier is not None and tier.cache.is_pinned()

    def cached_eight(base: int) -> list[int]:  # all eight blocks cached, evictable
        blocks = pool.allocate(8)
        for b in blocks:
            pool.commit(b, base + b)
        pool.release(reversed(blocks))
        return blocks

    # a first round: the first pinned staging and device buffers are allocated then, and a
    # page-locked or device allocation waits for the device (the H100 run of 2026-12-06 failed
    # here without it); later rounds reuse the cached memory, as an engine's steps do
    cached_eight(500)
    with tier.stream_ordered():
        pool.release(reversed(pool.allocate(8)))
    torch.cuda.synchronize()
    blocks = cached_eight(1000)
    want = cache.clone()
    side = torch.cuda.Stream()
    back = torch.zeros_like(cache)  # allocated now: a device allocation may wait for the device
    torch.cuda.synchronize()
    with tier.stream_ordered():
        torch.cuda._sleep(200_000_000)  # ~0.1 s of a step still running on this stream
        busy = torch.cuda.Event()
        busy.record()
        fresh = pool.allocate(8)  # evicts all eight: demoted, queued behind the "step"
        assert not busy.query()  # the host did not wait for the step nor the copy
        assert sorted(fresh) == list(range(8))
        # the next step overwrites the reused blocks (same stream); all eight, so no index
        # goes up from pageable memory (that waits for the stream: the copy would be done
        # before the promotion below, which would then have nothing to order itself after)
        cache.zero_()
    assert tier.ordered_demotions == 2 and tier.demoted_blocks == 16
    # a promotion on another stream orders itself after the pending copy
    with torch.cuda.stream(side):
        hits = tier.cpu_hits([1000 + b for b in blocks])
        assert len(hits) == 8
        tier.pool.acquire(hits)
        tier.device_cache = back  # promote into a second cache: compare block by block
        tier.promote(hits, blocks, [1000 + b for b in blocks])
        assert tier.order_waits == 1  # the copy was still queued: one wait for its 8 blocks
        tier.device_cache = cache
        tier.pool.release(reversed(hits))
    torch.cuda.synchronize()
    assert torch.equal(back[blocks], want[blocks])
    copier.close()


def test_stream_ordered_demotion_keeps_an_engines_tokens(
    make_gpu_llama: Callable[..., Path],
) -> None:
    """A small device pool with a CPU tier, four prompt stems in turn: each is demoted and
    promoted again; the tokens are those of a run with synchronous demotion."""
    loaded = load_model(str(make_gpu_llama(seed=5)), device="cuda")
    prompts = rotating_stem_prompts(512)
    plain, plain_extra = run_demoting(loaded, "cuda", prompts, ordered=False)
    ordered, extra = run_demoting(loaded, "cuda", prompts, ordered=True)
    assert ordered == plain
    assert plain_extra["ordered_demotions"] == 0
    assert extra["ordered_demotions"] > 0 and extra["promoted_blocks"] > 0
