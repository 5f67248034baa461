"""benchmarks/sparse_prefill_bound.py: its streaming-head density against the engine's own tile
count (prefill_tile_pairs, which the sparse kernel's counters were checked against), and its
bounds against a hand-worked row."""

from __future__ import annotations

import pytest
import torch

from kvrelay.benchmarks.sparse_prefill_bound import band_density, bounds, causal_flops
from kvrelay.workers.model.sparse_attention import prefill_tile_pairs


@pytest.mark.parametrize(
    ("ctx", "sink", "local", "tile"),
    [(4096, 128, 1024, 128), (5000, 128, 700, 128), (3000, 64, 256, 64), (1000, 128, 8192, 128)],
)
def test_band_density_matches_the_engines_tile_count(ctx: int, sink: int, local: int,
                                                     tile: int) -> None:  # fmt: skip
    col_block = 64
    nkb = -(-ctx // col_block)
    keep = (torch.arange(nkb) < -(-sink // col_block))[None]  # one streaming head: the sink
    window = torch.tensor([local])
    run, causal = prefill_tile_pairs(keep, window, 0, ctx, ctx, col_block, tile, tile)
    assert band_density(ctx, sink, local, tile) == pytest.approx(run / causal)


def test_bounds_of_a_hand_worked_row() -> None:
    ctx = 4096
    row = {
        "context": ctx, "gemm_s": 0.010, "density": 0.6,
        "attn_s": {"dense": 0.030, "sparse": 0.025, "sdpa": 0.020},
        "tiles": {"sparse_tile": [128, 128]},
    }  # fmt: skip
    b = bounds(row, 0.5, 700.0, 128, 1024)
    assert b["measured_ttft_ratio"] == pytest.approx(0.040 / 0.035)
    assert b["ideal_ours_ttft_ratio"] == pytest.approx(0.040 / (0.6 * 0.030 + 0.010))
    assert b["ideal_sdpa_ttft_ratio"] == pytest.approx(0.040 / (0.6 * 0.020 + 0.010))
    assert b["needed_2x_attn_ms"] == pytest.approx(10.0)  # 40 / 2 - 10 ms of GEMMs
    assert b["needed_2x_tflops"] == pytest.approx(0.6 * causal_flops(ctx) / 0.010 / 1e12)
    stream = band_density(ctx, 128, 1024, 128)
    assert b["density_dense_heads"] == pytest.approx(2 * 0.6 - stream)
    row["gemm_s"] = 0.050  # GEMMs alone past half the TTFT: no attention time reaches 2x
    assert bounds(row, 0.5, 700.0, 128, 1024)["needed_2x_tflops"] == float("inf")
