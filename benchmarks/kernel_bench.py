"""Kernel timings against the device's measured ceilings (one GPU, one run).

    python benchmarks/kernel_bench.py            # needs CUDA and triton

Ceilings, measured here: memory bandwidth = a 2 GiB device-to-device copy (bytes read + written);
matmul rate = an 8192^3 bf16 product. Each row prints the achieved fraction of its ceiling:

* decode attention, Llama-3.2-1B shape (32 heads, 8 KV heads, head_dim 64, 16 layers, page 16),
  1k-token contexts, batch 1/8/32/128: KV bytes read / time, per layer call (L2 flushed before
  each call by do_bench) and per 16-layer step replayed from one CUDA graph (no launch gaps);
  the torch reference per call beside it.
* prefill attention, one sequence of 1k and 8k new tokens, head_dim 64 and 128: causal FLOPs
  (4·H·D·n(n+1)/2) / time, beside torch SDPA (flash) on the same dense K/V.
* write_kv, pack/unpack/copy_blocks: bytes moved (read + written) / time, Triton vs torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import torch
import triton.testing

from kvrelay.kernels import reference, triton_ops
from kvrelay.kernels.reference import rel_err
from kvrelay.kernels.triton_decode import (
    DecodeTuning,
    choose_splits,
    paged_decode_attention_split,
)
from kvrelay.kernels.triton_prefill import PrefillTuning, paged_prefill_attention_tuned

L, H, HKV, D, PAGE = 16, 32, 8, 64, 16  # Llama-3.2-1B attention shape
# (num_splits, tuning): forced split counts with the default tuning, then tunings, auto splits.
DECODE_SWEEP = [(s, DecodeTuning()) for s in (1, 2, 4, 8, 16)] + [
    (None, DecodeTuning(64, 8, 2)), (None, DecodeTuning(32, 4, 3)),
    (None, DecodeTuning(128, 8, 2)), (None, DecodeTuning(64, 4, 3)),
]  # fmt: skip
PREFILL_SWEEP = [PrefillTuning(128, 64, 8, 3), PrefillTuning(128, 128, 8, 2),
                 PrefillTuning(128, 128, 8, 3), PrefillTuning(64, 64, 4, 3),
                 PrefillTuning(128, 64, 8, 4), PrefillTuning(64, 128, 4, 2)]  # fmt: skip


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` (events, L2 flushed before each call)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) / 1e3


def ceilings() -> tuple[float, float]:
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 2 / bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / bench(lambda: a @ b)
    return bw, flops


def paged_cache(tokens_per_seq: int, batch: int, head_dim: int = D) -> tuple[torch.Tensor, ...]:
    per_seq = math.ceil(tokens_per_seq / PAGE)
    blocks = batch * per_seq
    cache = torch.randn(blocks, L, 2, PAGE, HKV, head_dim, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda").to(torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), tokens_per_seq, device="cuda", dtype=torch.int32)
    return cache, tables, lens


def per_layer(
    op: Callable[..., object], q: torch.Tensor, cache: torch.Tensor, *rest: object
) -> Callable[[int], object]:
    """``layer -> op(q, cache, layer, *rest)``."""
    return lambda layer: op(q, cache, layer, *rest)


def graph_time(layer_call: Callable[[int], object]) -> float:
    """Median seconds per layer of a CUDA graph of 16 layer calls (no launch gaps, no host)."""
    for _ in range(2):  # compile outside the capture
        layer_call(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(L):
            layer_call(layer)
    return bench(graph.replay) / L


def decode_rows(bw: float) -> None:
    print(f"\n## decode attention, 1B shape, ctx 1024 (bandwidth ceiling {bw / 1e9:.0f} GB/s)")
    print("batch | splits | graph us/layer | GB/s | frac | eager us/call | ref us/call | err")
    for batch in (1, 8, 32, 128):
        cache, tables, lens = paged_cache(1024, batch)
        q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
        layer_bytes = batch * 1024 * HKV * D * 2 * 2  # K and V, bf16
        rest = (tables, lens, D**-0.5)
        want = reference.paged_decode_attention(q.float(), cache, 3, *rest)
        err = rel_err(triton_ops.paged_decode_attention(q, cache, 3, *rest), want)
        t_eager = bench(partial(triton_ops.paged_decode_attention, q, cache, 3, *rest))
        t_ref = bench(partial(reference.paged_decode_attention, q, cache, 3, *rest))
        t = graph_time(per_layer(triton_ops.paged_decode_attention, q, cache, *rest))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        splits = choose_splits(batch, HKV, tables.shape[1] * PAGE, sms)[0]
        print(
            f"{batch:5d} | {splits:6d} | {t * 1e6:14.1f} | {layer_bytes / t / 1e9:4.0f} | "
            f"{layer_bytes / t / bw:4.2f} | {t_eager * 1e6:13.1f} | {t_ref * 1e6:11.0f} | {err:.1e}"
        )
        sweep = []
        for n_splits, tuning in DECODE_SWEEP:
            fn = partial(paged_decode_attention_split, q, cache, 3, *rest, n_splits, tuning)
            bad = "" if rel_err(fn(), want) < 1e-2 else " WRONG"
            tt = graph_time(
                per_layer(paged_decode_attention_split, q, cache, *rest, n_splits, tuning)
            )
            sweep.append(f"{n_splits}/{tuple(tuning)}: {layer_bytes / tt / bw:.2f}{bad}")
        print("      sweep splits/(block_n, warps, stages): frac " + "; ".join(sweep))


def prefill_rows(flops: float) -> None:
    print(f"\n## prefill attention, causal, 1 sequence (matmul ceiling {flops / 1e12:.0f} TFLOP/s)")
    print("tokens | head_dim | triton ms | TFLOP/s | frac | sdpa(flash) ms | TFLOP/s | err")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for head_dim in (64, 128):
        for n in (1024, 8192):
            cache, tables, lens = paged_cache(n, 1, head_dim)
            q = torch.randn(n, H, head_dim, device="cuda", dtype=torch.bfloat16)
            qsl = torch.tensor([0, n], device="cuda", dtype=torch.int32)
            work = 4 * H * head_dim * n * (n + 1) / 2
            args = (q, cache, 0, tables, qsl, lens, head_dim**-0.5)
            kv = cache[tables[0].long(), 0].transpose(1, 2).reshape(-1, 2, HKV, head_dim)[:n]
            k = kv[:, 0].repeat_interleave(H // HKV, 1).transpose(0, 1)[None]  # [1, H, n, D]
            v = kv[:, 1].repeat_interleave(H // HKV, 1).transpose(0, 1)[None]
            dense = partial(sdpa, q.transpose(0, 1)[None], k, v, is_causal=True)
            want = dense()[0].transpose(0, 1)  # [n, H, D]
            t = bench(partial(triton_ops.paged_prefill_attention, *args))
            err = rel_err(triton_ops.paged_prefill_attention(*args), want)
            t_sdpa = bench(dense)
            print(
                f"{n:6d} | {head_dim:8d} | {t * 1e3:9.3f} | {work / t / 1e12:7.0f} | "
                f"{work / t / flops:4.2f} | {t_sdpa * 1e3:14.3f} | {work / t_sdpa / 1e12:7.0f}"
                f" | {err:.1e}"
            )
            if n != 8192:
                continue
            sweep = []
            for tuning in PREFILL_SWEEP:
                fn = partial(paged_prefill_attention_tuned, *args, tuning)
                bad = "" if rel_err(fn(), want) < 2e-2 else " WRONG"
                sweep.append(f"{tuple(tuning)}: {work / bench(fn) / 1e12:.0f} TFLOP/s{bad}")
            print("      sweep (block_m, block_n, warps, stages): " + "; ".join(sweep))


def movement_rows(bw: float) -> None:
    print(f"\n## KV movement, 1B shape (bandwidth ceiling {bw / 1e9:.0f} GB/s)")
    print("op | triton us | GB/s | frac | torch us | GB/s | frac")
    cache, _, _ = paged_cache(16 * 4096, 1)  # 4096 blocks of 512 KiB
    block_bytes = cache[0].numel() * 2
    ids = torch.randperm(cache.shape[0], device="cuda")[:256]
    dst = torch.randperm(cache.shape[0], device="cuda")[:256]
    packed = triton_ops.pack_blocks(cache, ids)
    other = torch.empty_like(cache)  # copy_blocks between two caches: one pass for Triton
    moved = 2 * 256 * block_bytes  # payload read once and written once
    rows: list[tuple[str, Callable[[], object], Callable[[], object], float]] = [
        ("pack 256 blocks", lambda: triton_ops.pack_blocks(cache, ids),
         lambda: reference.pack_blocks(cache, ids), moved),
        ("unpack 256 blocks", lambda: triton_ops.unpack_blocks(cache, dst, packed),
         lambda: reference.unpack_blocks(cache, dst, packed), moved),
        ("copy_blocks 256", lambda: triton_ops.copy_blocks(cache, ids, other, dst),
         lambda: reference.copy_blocks(cache, ids, other, dst), moved),
    ]  # fmt: skip
    tokens = 8192
    k = torch.randn(tokens, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(cache.shape[0] * PAGE, device="cuda")[:tokens]
    rows.append((
        f"write_kv {tokens} tokens", lambda: triton_ops.write_kv(cache, 5, k, v, slots),
        lambda: reference.write_kv(cache, 5, k, v, slots), 2 * 2 * k.numel() * 2,
    ))  # fmt: skip
    for name, fast, ref, nbytes in rows:
        t, t_ref = bench(fast), bench(ref)
        print(
            f"{name} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {nbytes / t / bw:.2f} | "
            f"{t_ref * 1e6:.1f} | {nbytes / t_ref / 1e9:.0f} | {nbytes / t_ref / bw:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "prefill", "move"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA device")
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
    )
    bw, flops = ceilings()
    print(
        f"ceilings: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s"
    )
    if "decode" not in args.skip:
        decode_rows(bw)
    if "prefill" not in args.skip:
        prefill_rows(flops)
    if "move" not in args.skip:
        movement_rows(bw)


if __name__ == "__main__":
    main()
