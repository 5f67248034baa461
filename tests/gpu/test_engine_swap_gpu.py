"""Swap-based preemption and the CPU tier on CUDA: copies run on the swap thread's own stream
(pinned host tier), overlapped with the batch; outputs match a run that never preempts, and a
demoted-then-promoted prefix is bit-identical."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.kernels import copy_blocks
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.sequence import SeqStatus
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.gpu


def _run(engine: Engine, prompts: list[list[int]], seen: set[SeqStatus]) -> list[list[int]]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, params)
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id] += ev.token_ids
        seen.update(s.status for s in engine.seqs.values())
        engine.check_integrity()
    return [out[f"g{i}"] for i in range(len(prompts))]


def test_async_swaps_on_cuda_keep_outputs(make_gpu_llama: Callable[..., Path]) -> None:
    loaded = load_model(str(make_gpu_llama(seed=3)), device="cuda")
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(8, 60))] for _ in range(8)]
    cfg = dict(block_size=16, max_num_batched_tokens=64)
    ref = _run(Engine(loaded, EngineConfig(num_blocks=256, cpu_num_blocks=0, **cfg),  # type: ignore[arg-type]
                      device="cuda"), prompts, set())
    swap = Engine(loaded, EngineConfig(num_blocks=12, cpu_num_blocks=256,  # type: ignore[arg-type]
                                       preemption_mode="swap", **cfg), device="cuda")
    assert swap.copier.is_async and swap.cpu_tier is not None
    assert swap.cpu_tier.cache.is_pinned()
    seen: set[SeqStatus] = set()
    assert _run(swap, prompts, seen) == ref
    s = swap.stats()
    assert s.swaps_out > 0 and s.swaps_in > 0 and s.recompute_preemptions == 0
    print("cuda swaps", s.swaps_out, s.swaps_in, s.swap_bytes, seen)
    rec = Engine(loaded, EngineConfig(num_blocks=12, preemption_mode="recompute", **cfg),  # type: ignore[arg-type]
                 device="cuda")
    assert _run(rec, prompts, set()) == ref
    swap.close()


def test_copy_blocks_between_the_device_and_pinned_host_memory() -> None:
    """Swaps' copies: gathered on the device, moved in runs of consecutive host blocks straight
    into / out of the pinned cache; the host side holds the data when the call returns."""
    dev = torch.randn(32, 2, 2, 16, 2, 64, device="cuda")
    host = torch.zeros((24, *dev.shape[1:]), pin_memory=True)
    src = torch.tensor([3, 4, 5, 9, 0, 1, 30])
    dst = torch.tensor([10, 11, 12, 2, 20, 21, 5])
    copy_blocks(dev, src, host, dst)
    assert torch.equal(host[dst], dev[src].cpu())
    back = torch.zeros_like(dev)
    copy_blocks(host, dst, back, src)
    torch.cuda.synchronize()
    assert torch.equal(back[src], dev[src])
