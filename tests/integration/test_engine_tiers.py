"""The CPU KV tier behind the engine's device pool: demotion on eviction, promotion on a prefix
hit, exact bytes both ways, identical outputs with the tier on or off, events per tier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.kv.block_hash import block_hashes
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import KVEventKind, SamplingParams, Tier
from kvrelay_testing.tiers import run_one_at_a_time

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BS = 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir))


def _engine(loaded: LoadedModel, **kw: object) -> Engine:
    base: dict[str, object] = dict(block_size=BS, num_blocks=64, max_num_batched_tokens=64)
    base.update(kw)
    return Engine(loaded, EngineConfig(**base))  # type: ignore[arg-type]


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 40000, (length,), generator=g).tolist() for _ in range(n)]


def test_demote_then_promote_is_bit_identical(loaded: LoadedModel) -> None:
    engine = _engine(loaded, num_blocks=16, cpu_num_blocks=64)
    assert engine.cpu_tier is not None
    (first,) = _prompts(1, 4 * BS + 1, seed=1)
    run_one_at_a_time(engine, [first], SamplingParams(max_tokens=1, temperature=0.0), prefix="a")
    chain = block_hashes(first, BS, engine.scheduler.hash_root)[:4]
    dev = engine.pool.lookup(chain)
    assert len(dev) == 4
    before = engine.kv_cache[dev].clone()
    engine.drain_kv_events()
    # other prompts fill the 16-block device pool: the first prompt's blocks are evicted
    run_one_at_a_time(
        engine, _prompts(4, 4 * BS + 1, seed=2), SamplingParams(max_tokens=1, temperature=0.0)
    )
    assert engine.pool.lookup(chain) == []
    cpu = engine.cpu_tier.pool.lookup(chain)
    assert len(cpu) == 4
    assert torch.equal(engine.cpu_tier.cache[cpu], before)
    events = engine.drain_kv_events()
    removed_gpu = {h for e in events if e.kind is KVEventKind.REMOVED and e.tier is Tier.GPU
                   for h in e.block_hashes}
    stored_cpu = {h for e in events if e.kind is KVEventKind.STORED and e.tier is Tier.CPU
                  for h in e.block_hashes}
    assert set(chain) <= removed_gpu & stored_cpu
    # the same prompt again: its prefix comes back from CPU, by copy, not by compute
    computed = engine.prompt_tokens_computed
    run_one_at_a_time(engine, [first], SamplingParams(max_tokens=1, temperature=0.0), prefix="b")
    assert engine.prompt_tokens_computed - computed == 1
    assert engine.stats().prefix_hit_tokens_cpu == 4 * BS
    dev = engine.pool.lookup(chain)
    assert len(dev) == 4 and torch.equal(engine.kv_cache[dev], before)
    stats = engine.stats()
    assert stats.cpu_pool is not None and stats.extra["promoted_blocks"] == 4
    assert stats.cpu_pool.cached >= 4
    engine.check_integrity()


def test_outputs_identical_with_the_tier_on_or_off(loaded: LoadedModel) -> None:
    # conversations sharing a 3-block system prefix plus their own 3-block turn; each runs
    # twice, and the device pool (16 blocks) cannot keep everything between the two rounds
    system = _prompts(1, 3 * BS, seed=3)[0]
    turns = [system + t for t in _prompts(5, 3 * BS + 2, seed=4)]
    workload = turns + turns
    runs = {}
    for name, kw in {
        "big": dict(num_blocks=256, cpu_num_blocks=0),
        "off": dict(num_blocks=16, cpu_num_blocks=0),
        "on": dict(num_blocks=16, cpu_num_blocks=128),
    }.items():
        engine = _engine(loaded, **kw)
        runs[name] = (engine, run_one_at_a_time(engine, workload, GREEDY))
    ref = runs["big"][1]
    assert runs["off"][1] == ref and runs["on"][1] == ref
    on, off = runs["on"][0].stats(), runs["off"][0].stats()
    assert on.prefix_hit_tokens_cpu > 0 and off.prefix_hit_tokens_cpu == 0
    assert on.prompt_tokens_computed < off.prompt_tokens_computed
    assert on.prefix_hit_tokens > off.prefix_hit_tokens
    assert off.cpu_pool is None and on.cpu_pool is not None


def test_cpu_tier_eviction_is_lru_and_drops(loaded: LoadedModel) -> None:
    engine = _engine(loaded, num_blocks=12, cpu_num_blocks=8)
    assert engine.cpu_tier is not None
    run_one_at_a_time(
        engine, _prompts(8, 4 * BS + 1, seed=5), SamplingParams(max_tokens=1, temperature=0.0)
    )
    cpu = engine.stats().cpu_pool
    assert cpu is not None and cpu.cached == 8 and cpu.extra["evictions"] > 0
    removed_cpu = [e for e in engine.drain_kv_events()
                   if e.kind is KVEventKind.REMOVED and e.tier is Tier.CPU]
    assert removed_cpu
    engine.clear_prefix_cache()
    assert engine.stats().cpu_pool.cached == 0  # type: ignore[union-attr]
    engine.check_integrity()


def test_bad_tier_size_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="cpu_num_blocks"):
        _engine(loaded, cpu_num_blocks=-1)
