"""Engine runs over the KV tiers: requests one at a time (``run_one_at_a_time``), and one
that keeps its CPU tier busy: prompts over four stems taken in turn, one
request at a time over a 16-block device pool, so each stem is demoted before it comes back
and is then promoted (tests of the stream-ordered demotion, on CPU and on CUDA)."""

from __future__ import annotations

import random

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams


def rotating_stem_prompts(vocab: int, seed: int = 2) -> list[list[int]]:
    rng = random.Random(seed)
    stems = [[rng.randrange(3, vocab) for _ in range(64)] for _ in range(4)]
    return [stems[i % 4] + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 40))]
            for i in range(12)]  # fmt: skip


def run_demoting(
    loaded: LoadedModel,
    device: str,
    prompts: list[list[int]],
    *,
    ordered: bool,
) -> tuple[list[list[int]], dict[str, float]]:
    """Greedy outputs and the engine's extra stats, with the stream-ordered demotion
    (``EngineConfig.stream_demotion``) ``ordered`` or not; pools checked after every step."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine = Engine(loaded, EngineConfig(num_blocks=16, cpu_num_blocks=64,
                                         max_num_batched_tokens=64, stream_demotion=ordered),
                    device=device)  # fmt: skip
    out = run_one_at_a_time(engine, prompts, params)
    extra = engine.stats().extra
    engine.close()
    return out, extra


def run_one_at_a_time(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, prefix: str = "r"
) -> list[list[int]]:
    """Requests one after another (each finishes before the next starts), the pools checked
    after every step: so eviction order, and so what the tiers hold, is deterministic."""
    outs: list[list[int]] = []
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, params)
        toks: list[int] = []
        while engine.has_unfinished():
            for ev in engine.step():
                toks += ev.token_ids
            engine.check_integrity()
        outs.append(toks)
    return outs
