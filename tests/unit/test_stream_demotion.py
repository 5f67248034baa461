"""Stream-ordered demotion (``EngineConfig.stream_demotion``, by default on unless
``KVRELAY_STREAM_DEMOTION=0``; workers/kv/tiers.py) is a CUDA matter: it queues the
device-to-host copy into a pinned host cache without waiting for it. On a host-memory engine
there is nothing to queue: with it on, demotions stay synchronous and the outputs are those of
a run without it. The CUDA side: tests/gpu/test_stream_demotion_gpu.py."""

from __future__ import annotations

from pathlib import Path

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
