"""Stream-ordered demotion (``KVRELAY_STREAM_DEMOTION=1``, workers/kv/tiers.py) is a CUDA
matter: it queues the device-to-host copy into a pinned host cache without waiting for it. On
a host-memory engine there is nothing to queue: with it on, demotions stay synchronous and the
outputs are those of a run without it. The CUDA side: tests/gpu/test_stream_demotion_gpu.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvrelay.workers.engine import scheduler as scheduler_mod
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.types import SamplingParams


def test_stream_ordered_demotion_is_synchronous_on_a_host_memory_engine(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    rng = random.Random(2)
    stems = [[rng.randrange(3, 100) for _ in range(64)] for _ in range(4)]
    # four stems in turn over a 16-block pool: a stem is demoted before it comes back
    prompts = [stems[i % 4] + [rng.randrange(3, 100) for _ in range(rng.randrange(8, 40))]
               for i in range(12)]  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def run(ordered: bool) -> tuple[list[list[int]], dict[str, float]]:
        monkeypatch.setattr(scheduler_mod, "STREAM_DEMOTION", ordered)
        engine = Engine(loaded, EngineConfig(num_blocks=16, cpu_num_blocks=64,
                                             max_num_batched_tokens=64), device="cpu")  # fmt: skip
        out: list[list[int]] = []
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
            toks: list[int] = []
            while engine.has_unfinished():
                for ev in engine.step():
                    toks += ev.token_ids
            engine.check_integrity()
            out.append(toks)
        extra = engine.stats().extra
        engine.close()
        return out, extra

    plain, plain_extra = run(False)
    ordered, extra = run(True)
    assert ordered == plain
    assert plain_extra["demoted_blocks"] > 0 and plain_extra["promoted_blocks"] > 0
    assert extra["demoted_blocks"] == plain_extra["demoted_blocks"]
    assert extra["ordered_demotions"] == 0  # the host cache is not pinned: nothing queued
