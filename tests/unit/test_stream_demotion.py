"""Stream-ordered demotion (``EngineConfig.stream_demotion``, by default on unless
``KVRELAY_STREAM_DEMOTION=0``; workers/kv/tiers.py) is a CUDA matter: it queues the
device-to-host copy into a pinned host cache without waiting for it. On a host-memory engine
there is nothing to queue: with it on, demotions stay synchronous and the outputs are those of
a run without it. The CUDA side: tests/gpu/test_stream_demotion_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import build_cpu_tier
from kvrelay.workers.model.loader import load_model
from kvrelay_testing.tiers import rotating_stem_prompts, run_demoting


def test_stream_ordered_demotion_is_synchronous_on_a_host_memory_engine(
    tiny_model_dir: Path,
) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = rotating_stem_prompts(100)
    plain, plain_extra = run_demoting(loaded, "cpu", prompts, ordered=False)
    ordered, extra = run_demoting(loaded, "cpu", prompts, ordered=True)
    assert ordered == plain
    assert plain_extra["demoted_blocks"] > 0 and plain_extra["promoted_blocks"] > 0
    assert extra["demoted_blocks"] == plain_extra["demoted_blocks"]
    assert extra["ordered_demotions"] == 0  # the host cache is not pinned: nothing queued


class _Event:
    def __init__(self, done: bool) -> None:
        self.done, self.queries = done, 0

    def query(self) -> bool:
        self.queries += 1
        return self.done


class _Stream:
    def __init__(self) -> None:
        self.waited: list[_Event] = []

    def wait_event(self, event: _Event) -> None:
        self.waited.append(event)


def test_pending_copies_are_waited_for_once_per_copy() -> None:
    """Reusing the CPU blocks of earlier stream-ordered copies queries each copy's event once
    and queues one stream wait per copy still running, not one per block (each CUDA call lets
    the other semi-PD lane take the GIL); blocks whose copy is done are forgotten."""
    cache = torch.zeros(64, 2, 2, 16, 2, 8)
    _, tier = build_cpu_tier(cache, BlockPool(64, 16), num_blocks=64, kv_gb=0.0,
                             async_copies=False)  # fmt: skip
    assert tier is not None
    running, done = _Event(False), _Event(True)
    tier._pending = {**dict.fromkeys(range(32), running), **dict.fromkeys(range(32, 48), done)}
    stream = _Stream()
    tier.order_after_pending(range(64), stream)
    assert stream.waited == [running] and tier.order_waits == 1
    assert running.queries == 1 and done.queries == 1
    assert set(tier._pending) == set(range(32))  # the done copy's blocks are forgotten


def test_the_switch_turns_off_every_default() -> None:
    """``KVRELAY_STREAM_DEMOTION=0`` (read at import, hence a fresh process) is the default of
    both the engine's config and a scheduler built without it."""
    code = (
        "import inspect;"
        "from kvrelay.workers.engine.config import EngineConfig;"
        "from kvrelay.workers.engine.scheduler import Scheduler;"
        "p = inspect.signature(Scheduler).parameters['stream_demotion'];"
        "print(EngineConfig().stream_demotion, p.default)"
    )
    for value, want in (("0", "False False"), ("1", "True True")):
        env = {**os.environ, "KVRELAY_STREAM_DEMOTION": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-2:] == want.split(), (value, out.stdout)
