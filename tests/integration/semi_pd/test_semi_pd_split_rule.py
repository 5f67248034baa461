"""The semi-PD worker's SM shares (fp32, CPU): the SLO-aware split rule driving the lanes, and
each lane's CUDA graph sets, one per share it may run in, captured up front and switched with
its share. A green-context partition is stood in for on CPU (``GreenOnCpu``): the shares are
recorded, not enforced. The other worker-level tests, on the same tiny random-weight Llama of
``tiny_model_dir``, are in test_semi_pd.py; the split rule itself, unit by unit, in
tests/unit/test_semi_pd_split.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.semi_pd import worker as semi_pd_worker
from kvrelay.workers.semi_pd.sm_partition import CpuPartition, Lane, Split
from kvrelay.workers.semi_pd.split_rule import SplitRuleConfig
from kvrelay.workers.semi_pd.worker import PREFILL_TOKENS, SemiPDWorker
from kvrelay.workers.types import SamplingParams
from kvrelay.workers.worker import Worker
from kvrelay_testing.semi_pd import (
    CONFIG,
    Collector,
    Reference,
    assert_clean,
    generate,
)


class GreenOnCpu(CpuPartition):
    """Stands in for the green-context partition on CPU: records the shares, and each lane's
    request for a share's stream (None here: the prefill graphs' padded path runs eagerly)."""

    enforced = True

    def __init__(self, split: Split) -> None:
        super().__init__(split)
        self.streams_asked: list[tuple[Lane, int]] = []

    def stream(self, lane: Lane, share: int) -> None:
        self.streams_asked.append((lane, share))


def test_split_rule_captures_every_shares_graph_set_at_start(
    loaded: LoadedModel,
    prompts: list[list[int]],
    colocated: Reference,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the split rule on and graphs captured at start, each lane enters every share the
    rule may move it to (nearest first) and captures that share's set there, then goes back to
    its start share before serving; without the rule only the start share's set is captured.
    A green-context partition of three shares stood in for; tokens as colocated."""

    class ThreeShares(GreenOnCpu):
        def shares(self) -> list[int]:
            return [50, 60, 100]

    parts: list[ThreeShares] = []

    def build(device: torch.device, initial: Split, step: int, decode_first: bool) -> ThreeShares:
        parts.append(ThreeShares(initial))
        return parts[-1]

    captured: list[tuple[str, int]] = []

    def capture_decode(engine: Engine) -> int:
        captured.append(("decode", parts[-1].share(Lane.DECODE)))
        return 0

    def capture_prefill(engine: Engine) -> None:
        captured.append(("prefill", parts[-1].share(Lane.PREFILL)))

    monkeypatch.setattr(semi_pd_worker, "build_partition", build)
    monkeypatch.setattr(semi_pd_worker, "GreenContextPartition", ThreeShares)
    monkeypatch.setattr(Engine, "capture_graphs", capture_decode)
    monkeypatch.setattr(semi_pd_worker, "_capture_prefill_graphs", capture_prefill)
    sink = Collector()
    config = replace(CONFIG, capture_graphs=True)
    rule = SplitRuleConfig(ttft_slo_s=1e6, tpot_slo_s=1e6)  # met: the split stays
    for split_rule, want in ((None, [100]), (rule, [100, 60, 50])):
        captured.clear()
        semi = SemiPDWorker("s", "colocated", model=loaded, engine_config=config, sink=sink,
                            split_rule=split_rule)  # fmt: skip
        try:
            for lane in ("decode", "prefill"):  # the start share first, then nearest first
                assert [share for name, share in captured if name == lane] == want, lane
            assert semi.split() == Split(100, 100)
            params = [SamplingParams(max_tokens=8, temperature=0.0) for _ in prompts[:2]]
            assert generate(semi, sink, prompts[:2], params, "s") == colocated(prompts[:2], params)
        finally:
            semi.shutdown()


def test_prefill_lane_switches_its_prefill_graph_set_with_its_share(
    loaded: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With prefill graphs on (their padded path, eager on CPU) the prefill lane runs its steps
    through them, token buckets up to its whole budget, and enters each share's own set with
    that share's stream (a green-context partition stood in for); the decode lane has none.
    The greedy tokens stay the colocated worker's through a split change mid-run."""
    partitions: list[GreenOnCpu] = []

    def build(device: torch.device, initial: Split, step: int, decode_first: bool) -> GreenOnCpu:
        partitions.append(GreenOnCpu(initial))
        return partitions[-1]

    monkeypatch.setattr(semi_pd_worker, "build_partition", build)
    monkeypatch.setattr(semi_pd_worker, "GreenContextPartition", GreenOnCpu)
    sink = Collector()
    params = [SamplingParams(max_tokens=16, temperature=0.0) for _ in prompts]
    config = replace(CONFIG, prefill_graphs=True)
    colocated = Worker("c", "colocated", model=loaded, engine_config=CONFIG, sink=sink)
    semi = SemiPDWorker(
        "s", "colocated", model=loaded, engine_config=config, sink=sink, split=Split(60, 100)
    )
    try:
        (part,) = partitions
        runner = semi.prefill_engine.runner
        graphs = runner.prefill
        assert graphs is not None and graphs.sizes[-1] == PREFILL_TOKENS
        assert semi.engine.runner.prefill is None
        half = len(prompts) // 2
        got = generate(semi, sink, prompts[:half], params[:half], "s")
        assert semi.prefill_loop.call(lambda e: graphs.set_key) == 60
        semi.set_split(Split(30, 70))  # entered before the next request's prefill
        got += generate(semi, sink, prompts[half:], params[half:], "t")
        assert got == generate(colocated, sink, prompts, params, "c")
        assert semi.split() == Split(30, 70)
        assert graphs.set_key == 30 and graphs.num_graphs == 0
        # only the prefill lane has graphs on CPU (its prefill graphs), so only it asks
        assert part.streams_asked == [(Lane.PREFILL, 60), (Lane.PREFILL, 30)]
        steps = semi.prefill_loop.call(lambda e: e.runner.prefill_graph_steps)
        assert steps > 0 and graphs.steps == steps
        assert_clean(semi)
    finally:
        colocated.shutdown()
        semi.shutdown()


@pytest.mark.parametrize(
    ("ttft_slo_s", "moves"), [(1e-6, True), (1e6, False)], ids=["ttft-fails", "slos-met"]
)
def test_split_rule_drives_the_lanes(
    loaded: LoadedModel, prompts: list[list[int]], ttft_slo_s: float, moves: bool
) -> None:
    """The SLO-aware split on a real worker: every 10 ms a window closes (at either lane's next
    step); a TTFT SLO no prefill can meet raises the prefill lane's share at the first window
    that saw a first token (logged, in wall-clock time), SLOs everyone meets leave the split
    alone. On CPU the shares are recorded, not enforced."""
    sink = Collector()
    rule = SplitRuleConfig(ttft_slo_s=ttft_slo_s, tpot_slo_s=1e6)
    semi = SemiPDWorker(
        "s",
        "colocated",
        model=loaded,
        engine_config=CONFIG,
        sink=sink,
        split=Split(50, 100),
        split_rule=rule,
        window_s=0.01,
    )
    try:
        t0 = time.time()
        generate(semi, sink, prompts[:3], [SamplingParams(max_tokens=16, temperature=0.0)] * 3, "r")
        assert semi.tuner is not None and semi.tuner.windows_closed >= 3
        changes = semi.tuner.changes
        windows = semi.window_log()  # every window, changed or not, in wall-clock time
        assert len(windows) == semi.tuner.windows_closed
        assert all(t0 <= w["t"] <= time.time() for w in windows)
        assert sum(w["old"] != w["new"] for w in windows) == len(changes)
        assert all(w["ttft_slo_s"] == ttft_slo_s and w["tpot_slo_s"] == 1e6 for w in windows)
        if moves:
            first = changes[0]
            assert first.old == Split(50, 100) and first.new.prefill > 50
            assert first.reason.startswith("TTFT") and first.window.ttft_s > ttft_slo_s
            sink.wait(lambda: semi.split() == changes[-1].new)  # both lanes entered it
            logged = semi.split_log()
            assert [(e["old"], e["new"]) for e in logged] == [
                ([c.old.prefill, c.old.decode], [c.new.prefill, c.new.decode]) for c in changes
            ]
            assert t0 <= logged[0]["t"] <= time.time() and logged[0]["reason"].startswith("TTFT")
        else:
            assert changes == [] and semi.split() == Split(50, 100) and semi.split_log() == []
        extra = semi.heartbeat().stats.extra  # what the controller sees of it
        assert (extra["semi_pd_prefill_sm"], extra["semi_pd_decode_sm"]) == (
            semi.split().prefill,
            semi.split().decode,
        )
        assert extra["semi_pd_split_changes"] == len(changes)
        assert_clean(semi)
    finally:
        semi.shutdown()
