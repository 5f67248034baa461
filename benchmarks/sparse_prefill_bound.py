"""What sparse prefill can reach on random data: bounds on the TTFT ratio, from a recorded
``sparse_bench.json`` (issue 19's prefill goal, sparse TTFT >= 2x our dense at 64k and 128k).

TTFT per layer = attention + the layer's GEMMs (``gemm_s``, timed at the same length). At the
measured density (the share of causal tiles the sparse kernel runs), three bounds on the sparse
attention's time:

- ``ideal_ours``: density x our dense kernel's time (sampling free, each tile as fast as dense);
- ``ideal_sdpa``: density x torch SDPA's time (as fast a tile as flash attention);
- ``needed_2x``: the attention time at which TTFT would be half of dense's, and the bf16 rate a
  kernel would need to run the kept tiles in that time, against the measured matmul peak.

The density splits into the streaming heads' (counted here from the mask's geometry: sink +
local window, in the kernel's tiles) and the dense heads' (what SampleAttention kept, derived
from the measured total). Nothing here runs a GPU; the inputs are recorded measurements.

    python benchmarks/sparse_prefill_bound.py benchmarks/results/gpu_h200_s26/sparse_bench.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

H, HKV, D = 32, 8, 128  # the 8B shape sparse_bench.py times


def band_density(ctx: int, sink: int, local: int, tile: int) -> float:
    """The share of causal (query tile, key tile) pairs a streaming head runs: a pair runs when
    some row of the query tile sees some key of the key tile within the sink or the window."""
    n = (ctx + tile - 1) // tile
    run = causal = 0
    for qi in range(n):
        q0 = qi * tile  # the tile's first row: the one whose window reaches least far back
        for ki in range(qi + 1):
            k0, k1 = ki * tile, min(ctx, (ki + 1) * tile) - 1  # first and last key
            causal += 1
            in_sink = k0 < sink
            in_window = k1 > q0 - local  # the tile's last key within the first row's window
            run += in_sink or in_window
    return run / causal


def causal_flops(ctx: int) -> float:
    """bf16 FLOPs of one layer's causal attention (QK^T and PV, 2 flops a multiply-add)."""
    return 4.0 * D * H * ctx * (ctx + 1) / 2


def bounds(row: dict[str, Any], stream_fraction: float, peak_tflops: float, sink: int,
           local: int) -> dict[str, float]:  # fmt: skip
    ctx, t, gemm, rho = row["context"], row["attn_s"], row["gemm_s"], row["density"]
    tile = row.get("tiles", {}).get("sparse_tile", [128, 128])[1]  # older runs: 128
    dense, sdpa = t["dense"], t["sdpa"]
    rho_stream = band_density(ctx, sink, local, tile)
    rho_dense_heads = (rho - stream_fraction * rho_stream) / (1 - stream_fraction)
    ttft = dense + gemm
    needed = ttft / 2 - gemm  # attention time at which TTFT halves
    return {
        "context": ctx,
        "density": rho,
        "density_streaming_heads": rho_stream,
        "density_dense_heads": rho_dense_heads,
        "measured_ttft_ratio": ttft / (t["sparse"] + gemm),
        "ideal_ours_ttft_ratio": ttft / (rho * dense + gemm),
        "ideal_sdpa_ttft_ratio": ttft / (rho * sdpa + gemm),
        "needed_2x_attn_ms": needed * 1e3,
        "sdpa_tflops": causal_flops(ctx) / sdpa / 1e12,
        "needed_2x_tflops": rho * causal_flops(ctx) / needed / 1e12 if needed > 0 else float("inf"),
        "peak_tflops": peak_tflops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--peak-tflops", type=float, default=748.0,
                    help="the measured bf16 matmul rate (H200: 748, issue 17)")  # fmt: skip
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--local", type=int, default=8192, help="streaming heads' prefill window")
    args = ap.parse_args()
    data = json.load(open(args.bench_json))
    frac = data["args"]["stream_fraction"]
    print(f"{data['device']}, streaming fraction {frac}, sink {args.sink} + local {args.local}")
    print(
        "| context | density (streaming / dense heads) | TTFT ratio measured | ideal, our tile "
        "speed | ideal, SDPA tile speed | 2x needs attention ms | at TFLOP/s (SDPA runs, peak) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in data["prefill"]:
        b = bounds(row, frac, args.peak_tflops, args.sink, args.local)
        print(
            f"| {b['context'] // 1024}k | {b['density']:.3f} ({b['density_streaming_heads']:.3f}"
            f" / {b['density_dense_heads']:.3f}) | {b['measured_ttft_ratio']:.2f}x | "
            f"{b['ideal_ours_ttft_ratio']:.2f}x | {b['ideal_sdpa_ttft_ratio']:.2f}x | "
            f"{b['needed_2x_attn_ms']:.1f} | {b['needed_2x_tflops']:.0f} ({b['sdpa_tflops']:.0f},"
            f" {b['peak_tflops']:.0f}) |"
        )


if __name__ == "__main__":
    main()
