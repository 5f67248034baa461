"""The engine's state kept across steps (the runner's block tables, the sampler's batch
parameters, the scheduler's steady decode plan) against the same engine rebuilding them from
scratch every step, on the default
model: requests with mixed sampling parameters join mid-run, finish, are aborted and are
preempted (recompute, swap), with and without the overlapped scheduler; every step's events are
the same, and both pools stay clean."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.engine.block_tables import BlockTables
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.sampler import Sampler
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import SamplingParams

PARAMS = [  # greedy or seeded only: a fresh Sampler draws what a kept one draws
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=18, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.8, top_k=40, seed=5, repetition_penalty=1.3),
    SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
    SamplingParams(max_tokens=22, temperature=1.1, min_p=0.05, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.0),  # may end on EOS
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(None)


def _engine(loaded: LoadedModel, overlap: bool, pool: dict[str, object]) -> Engine:
    config: dict[str, object] = dict(
        num_blocks=12, max_num_batched_tokens=40, max_num_seqs=6, cpu_num_blocks=0,
        overlap_schedule=overlap,
    )  # fmt: skip
    config.update(pool)
    return Engine(loaded, EngineConfig(**config))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overlap", "pool"),
    [
        (False, {"preemption_mode": "recompute"}),
        (True, {"preemption_mode": "recompute"}),
        (False, {"cpu_num_blocks": 64, "preemption_mode": "swap"}),
    ],
    ids=["plain-recompute", "overlap-recompute", "plain-swap"],
)
def test_kept_state_equals_rebuilt_state(
    loaded: LoadedModel, overlap: bool, pool: dict[str, object]
) -> None:
    rng = random.Random(7)
    tok = loaded.tokenizer
    arrivals = {  # step -> requests added before it
        0: 3, 2: 2, 5: 2, 9: 1, 14: 2, 20: 1,
    }  # fmt: skip
    kept, fresh = _engine(loaded, overlap, pool), _engine(loaded, overlap, pool)
    n = 0
    aborted = False
    step = 0
    tokens: dict[str, list[int]] = {}
    while step < 400 and (step <= max(arrivals) or kept.has_unfinished()):
        for _ in range(arrivals.get(step, 0)):
            topic = f" Tell me about the number {rng.randrange(1000)}." * rng.randint(2, 4)
            prompt = tok.encode(f"Request {n}:{topic}")
            for e in (kept, fresh):
                e.add_request(f"r{n}", prompt, PARAMS[n % len(PARAMS)])
            n += 1
        if not aborted and step >= 12 and kept.seqs:  # one leaves mid-run
            victim = min(kept.seqs)
            aborted = kept.abort(victim) and fresh.abort(victim)
        fresh.runner.tables = BlockTables(fresh.device)  # rebuilt from the block lists
        fresh.sampler = Sampler(seed=fresh.config.seed)  # parameters split again
        fresh.scheduler._steady = None  # the plan built row by row
        got, want = kept.step(), fresh.step()
        assert got == want, f"step {step}"
        for ev in got:
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        for e in (kept, fresh):
            e.check_integrity()
        step += 1
    assert not kept.has_unfinished() and not fresh.has_unfinished()
    assert aborted and len(tokens) == n
    stats = kept.stats()
    assert stats.preemptions > 0, "the pool never ran dry: preemption untested"
    assert stats.pool.used == 0 and (stats.cpu_pool is None or stats.cpu_pool.used == 0)
    # incremental: rows are written when a sequence joins or changes blocks, not every step
    rows_run = stats.decode_tokens_computed
    assert 0 < kept.runner.tables.row_writes < rows_run / 3
    assert kept.scheduler.steady_plans > 0 and fresh.scheduler.steady_plans == 0
