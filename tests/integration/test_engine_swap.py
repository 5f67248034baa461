"""Swap-based preemption: exact KV round trips, identical outputs (greedy and seeded sampling)
with preemption forced by a tiny device pool, in swap and in recompute mode, synchronous and
with copies on the background thread; a repeat swap-out copies only the new blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.sequence import SeqStatus
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import SamplingParams

BS = 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def _engine(loaded: LoadedModel, **kw: object) -> Engine:
    base: dict[str, object] = dict(block_size=BS, num_blocks=256, max_num_batched_tokens=32)
    base.update(kw)
    return Engine(loaded, EngineConfig(**base))  # type: ignore[arg-type]


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(10, 40000, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g)
        .tolist() for _ in range(n)
    ]


def _params(seeded: bool, n: int = 6, tokens: int = 16) -> list[SamplingParams]:
    if not seeded:
        return [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * n
    return [SamplingParams(max_tokens=tokens, temperature=1.2, top_k=100, seed=100 + i,
                           ignore_eos=True) for i in range(n)]


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
              seen: set[SeqStatus] | None = None) -> list[list[int]]:
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"q{i}", p, sp)
    out: dict[str, list[int]] = {f"q{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id] += ev.token_ids
        if seen is not None:
            seen.update(s.status for s in engine.seqs.values())
        engine.check_integrity()
    stats = engine.stats()
    assert stats.pool.used == 0 and (stats.cpu_pool is None or stats.cpu_pool.used == 0)
    return [out[f"q{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_forced_preemption_keeps_outputs(loaded: LoadedModel, seeded: bool) -> None:
    prompts, params = _prompts(6, seed=7), _params(seeded)
    ref = _generate(_engine(loaded, cpu_num_blocks=0), prompts, params)
    tiny = dict(num_blocks=10, cpu_num_blocks=256)

    swap = _engine(loaded, preemption_mode="swap", **tiny)
    assert _generate(swap, prompts, params) == ref
    s = swap.stats()
    assert s.swaps_out > 0 and s.swaps_in == s.swaps_out and s.recompute_preemptions == 0
    assert s.swap_bytes > 0 and s.preemptions == s.swaps_out

    rec = _engine(loaded, preemption_mode="recompute", **tiny)
    assert _generate(rec, prompts, params) == ref
    r = rec.stats()
    assert r.recompute_preemptions > 0 and r.swaps_out == 0 and r.swap_bytes == 0

    if seeded:
        return
    threaded = _engine(loaded, preemption_mode="swap", async_swaps=True, **tiny)
    seen: set[SeqStatus] = set()
    assert _generate(threaded, prompts, params, seen) == ref
    assert threaded.stats().swaps_in > 0 and SeqStatus.SWAPPED_OUT in seen
    threaded.close()


@pytest.fixture(scope="module")
def thrash_case() -> tuple[LoadedModel, list[list[int]], list[SamplingParams], list[list[int]]]:
    """The default model, 16 prompts of 32 tokens, their parameters and a roomy engine's tokens
    (computed once for both engines below)."""
    default = load_model(None)
    rng = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 40000, (32,), generator=rng).tolist() for _ in range(16)]
    params = _params(False, n=16, tokens=32)
    ref = _generate(Engine(default, EngineConfig(num_blocks=256, cpu_num_blocks=0)), prompts, params)
    return default, prompts, params, ref


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_asynchronous_swaps_do_not_thrash(
    thrash_case: tuple[LoadedModel, list[list[int]], list[SamplingParams], list[list[int]]],
    overlap: bool,
) -> None:
    """A swap-in leaves a block of growth for every sequence running or landing. Without it,
    with copies on the background thread taking longer than a step (the default model's
    737 kB blocks), the next step preempted one of them again: 16 requests in a 16-block pool
    took 2,360 swaps and 4,593 steps. And out of blocks, a row waits for the blocks a
    swap-out in flight will free rather than preempt more requests (24 swaps before, 9-10
    now); the overlapped engine (the CUDA default) keeps the outputs with rows sitting out."""
    default, prompts, params, ref = thrash_case
    engine = Engine(default, EngineConfig(preemption_mode="swap", async_swaps=True, num_blocks=16,
                                          cpu_num_blocks=512, enable_prefix_caching=False,
                                          overlap_schedule=overlap))
    assert _generate(engine, prompts, params) == ref
    s = engine.stats()
    assert 0 < s.swaps_out <= len(prompts), s.swaps_out
    engine.close()


def test_auto_mode_weighs_copy_against_recompute(loaded: LoadedModel) -> None:
    prompts, params = _prompts(4, seed=8), _params(False, n=4, tokens=10)
    tiny = dict(num_blocks=8, cpu_num_blocks=256)
    # copies absurdly slow: recompute; recompute absurdly slow: swap
    slow_copy = _engine(loaded, swap_gb_per_s=1e-9, recompute_tokens_per_s=1e6, **tiny)
    _generate(slow_copy, prompts, params)
    assert slow_copy.stats().swaps_out == 0 and slow_copy.stats().recompute_preemptions > 0
    slow_compute = _engine(loaded, recompute_tokens_per_s=1e-3, **tiny)
    _generate(slow_compute, prompts, params)
    assert slow_compute.stats().swaps_out > 0 and slow_compute.stats().recompute_preemptions == 0
    # CPU tier too small for a request: fall back to recompute
    cramped = _engine(loaded, preemption_mode="swap", num_blocks=8, cpu_num_blocks=1)
    _generate(cramped, prompts, params)
    assert cramped.stats().recompute_preemptions > 0


def test_auto_mode_measures_the_copy_rate(loaded: LoadedModel) -> None:
    """No configured copy rate: a probe seeds it and every swap's copy moves it; the rule then
    swaps when recompute costs more than the measured round trip, and recomputes when it
    costs less."""
    prompts, params = _prompts(4, seed=8), _params(False, n=4, tokens=10)
    tiny = dict(num_blocks=8, cpu_num_blocks=256)
    slow_compute = _engine(loaded, recompute_tokens_per_s=1e-3, **tiny)
    sw = slow_compute.scheduler.swapper
    assert sw is not None and sw.measure_copies
    probed = sw.bytes_per_s
    assert probed > 0
    ref = _generate(_engine(loaded, cpu_num_blocks=0), prompts, params)
    assert _generate(slow_compute, prompts, params) == ref
    s = slow_compute.stats()
    assert s.swaps_out > 0 and s.recompute_preemptions == 0
    assert s.extra["swap_bytes_per_s"] == sw.bytes_per_s != probed  # followed the copies
    # recompute a thousand times cheaper than the measured round trip of one token's KV
    per_token = slow_compute.block_bytes / BS
    fast = 1e3 * sw.bytes_per_s / (2 * per_token)
    fast_compute = _engine(loaded, recompute_tokens_per_s=fast, **tiny)
    assert _generate(fast_compute, prompts, params) == ref
    f = fast_compute.stats()
    assert f.swaps_out == 0 and f.recompute_preemptions > 0


def test_swap_round_trip_is_exact_and_repeat_swap_copies_only_new_blocks(
    loaded: LoadedModel,
) -> None:
    engine = _engine(loaded, preemption_mode="swap", cpu_num_blocks=64)
    tier, swapper = engine.cpu_tier, engine.scheduler.swapper
    assert tier is not None and swapper is not None
    prompt = _prompts(1, seed=9)[0][:4 * BS + 2] + [11] * (4 * BS)
    engine.add_request("a", prompt[: 4 * BS + 2], SamplingParams(max_tokens=40, temperature=0.0,
                                                                 ignore_eos=True))
    sch = engine.scheduler
    seq = engine.seqs["a"]
    for _ in range(3):
        engine.step()
    n_blocks = -(-seq.num_computed // BS)
    kv = engine.kv_cache[seq.block_ids[:n_blocks]].clone()
    computed = seq.num_computed
    first_full = computed // BS  # hashed blocks at the first swap-out

    def preempt() -> int:
        before = swapper.swap_bytes
        sch._preempt(seq)  # what the scheduler does when the pool runs dry
        assert seq.status is SeqStatus.SWAPPED_OUT and not seq.block_ids
        assert seq.num_computed == computed
        engine.check_integrity()
        return swapper.swap_bytes - before

    copied = preempt()
    assert copied == len(seq.cpu_block_ids) * engine.block_bytes  # first swap: every block
    assert torch.equal(tier.cache[seq.cpu_block_ids[:n_blocks]], kv)
    engine.pool.clear_cache()  # the device copies are gone: swap-in must copy
    engine.step()  # swapped back in, then decodes one token
    assert seq.status is SeqStatus.RUNNING and not seq.cpu_block_ids
    assert torch.equal(engine.kv_cache[seq.block_ids[:n_blocks]], kv)
    assert engine.stats().swaps_in == 1

    for _ in range(2 * BS):  # decode two more blocks' worth
        engine.step()
    computed = seq.num_computed
    total = -(-computed // BS)
    copied = preempt()
    # the earlier full blocks are still valid in CPU: only the blocks since are copied
    assert first_full > 0 and total > first_full
    assert copied == (total - first_full) * engine.block_bytes
    assert copied < total * engine.block_bytes
    out = []
    while engine.has_unfinished():
        out += [t for ev in engine.step() for t in ev.token_ids]
    ref = _engine(loaded, cpu_num_blocks=0)
    ref.add_request("a", prompt[: 4 * BS + 2], seq.params)
    ref_out = []
    while ref.has_unfinished():
        ref_out += [t for ev in ref.step() for t in ev.token_ids]
    assert seq.output_ids == ref_out
    engine.check_integrity()


def test_abort_while_swapped_frees_both_tiers(loaded: LoadedModel) -> None:
    engine = _engine(loaded, preemption_mode="swap", async_swaps=True, cpu_num_blocks=64)
    engine.add_request("a", _prompts(1, seed=3)[0], SamplingParams(max_tokens=8))
    engine.step()
    engine.scheduler._preempt(engine.seqs["a"])
    assert engine.abort("a")
    engine.check_integrity()
    s = engine.stats()
    assert s.pool.used == 0 and s.cpu_pool is not None and s.cpu_pool.used == 0
    assert not engine.has_unfinished()
    engine.close()


def test_bad_preemption_mode_is_refused(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="preemption_mode"):
        _engine(loaded, preemption_mode="sometimes")


def test_engine_priority_policy_preempts_by_swap(loaded: LoadedModel) -> None:
    engine = _engine(loaded, policy="priority", num_blocks=8, cpu_num_blocks=64)
    low, high = list(range(200, 220)), list(range(300, 312))  # 5 and 3 blocks
    # at most 30 tokens: 8 blocks, the whole pool
    engine.add_request("low", low, SamplingParams(max_tokens=10, temperature=0.0,
                                                  ignore_eos=True), priority=5)
    for _ in range(3):
        engine.step()
    assert engine.pool.num_available < 3  # no room for another 12-token prompt
    engine.add_request("high", high, SamplingParams(max_tokens=4, temperature=0.0,
                                                         ignore_eos=True), priority=0)
    done: list[str] = []
    while engine.has_unfinished():
        done += [ev.request_id for ev in engine.step() if ev.finish_reason is not None]
        engine.check_integrity()
    assert done == ["high", "low"]
    s = engine.stats()
    assert s.swaps_out >= 1 and s.swaps_in >= 1 and s.recompute_preemptions == 0
