"""Sparse attention speed, one attention layer of the Llama-3.1-8B shape (32 heads, 8 KV heads,
head_dim 128, bf16, block 16) on random data: prefill and decode, sparse vs our dense Triton
kernels vs torch SDPA (flash), as ratios from one run.

Sparse runs the real code path (workers/model/sparse_attention.py: sampling, selection, kernels),
with LServe's head split (half the KV heads streaming, ``--stream-fraction``). Random keys make
attention diffuse, so the SampleAttention columns of the dense heads keep most blocks (the
density it reports is what random data earns; real text is far sparser, see
benchmarks/sparse_accuracy.py). TTFT estimate = layers × (attention + the layer's GEMMs, timed
at the same length). Decode rows also count the aten ops of a layer call and of what a step's
first layer adds once (``ops_per_layer_call``; benchmarks/README.md, "Decode host overhead").
Decode rows also time a step of up to LAYERS layers (as many as fit) captured in one CUDA graph
and replayed (``graph``: dense, and sparse at a refresh and with the selection reused, per layer,
no host launches in the time; GPU only), and from those what a step costs the engine per layer
with the selection refreshed every 1, 2 or 4 steps (``engine_step_s_per_layer``; the default
``reuse_steps`` is 1). Prefill rows also count the tiles each kernel runs (``tiles``: dense and
sparse at their tile shapes, the sparse kernel's own counter on the GPU) beside the time of the
sparse kernel alone (``attn_s.sparse_kernel``, masks given).
Prefill rows also time the SampleAttention sampling alone (``sample_ms``, the strided rows and
the last ``sample_last`` rows with the column choice:
the fused Triton kernel and the torch reference, on the dense heads as the prefill path calls it;
``sample_keep_agree``: the share of column blocks both keep or both skip) and the whole sparse
layer with the torch sampling (``attn_s.sparse_torch_sample``, through KVRELAY_REFERENCE_OPS).

    python benchmarks/sparse_bench.py --contexts 32768 65536 131072 --out $OUT/sparse_bench.json

Its timers, op counter and graph capture: sparse_tools.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kvrelay import kernels
from kvrelay.benchmarks.sparse_tools import bench, captured, empty_cache, ops_of, reference_ops
from kvrelay.kernels import triton_prefill, triton_sparse_prefill
from kvrelay.kernels.sparse_reference import gather_kv
from kvrelay.workers.model.llama import AttentionMetadata
from kvrelay.workers.model.sparse_attention import (
    SparseAttention,
    SparseConfig,
    prefill_tile_pairs,
)
from kvrelay.workers.model.sparse_select import DecodeStep, sample_columns

H, HKV, D, LAYERS, HIDDEN, INTER, BS = 32, 8, 128, 32, 4096, 14336, 16


def streaming_mask(fraction: float) -> torch.Tensor:
    mask = torch.zeros(1, HKV, dtype=torch.bool)
    mask[0, : round(fraction * HKV)] = True
    return mask


def gemm_seconds(tokens: int, dev: str) -> float:
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
    w_qkv = torch.randn(H * D + 2 * HKV * D, HIDDEN, device=dev, dtype=torch.bfloat16)
    w_o = torch.randn(HIDDEN, H * D, device=dev, dtype=torch.bfloat16)
    w_gu = torch.randn(2 * INTER, HIDDEN, device=dev, dtype=torch.bfloat16)
    w_d = torch.randn(HIDDEN, INTER, device=dev, dtype=torch.bfloat16)

    def layer() -> None:
        F.linear(x, w_qkv)
        F.linear(x, w_o)
        h = F.linear(x, w_gu)
        F.linear(h[:, :INTER], w_d)

    return bench(layer, rep=20)


class PrefillCase(NamedTuple):
    q: torch.Tensor  # [ctx, H, D]: one sequence's prompt, no cached prefix
    cache: torch.Tensor  # one layer's KV of its ctx tokens
    table: torch.Tensor
    attn: AttentionMetadata
    sparse: SparseAttention


def prefill_case(ctx: int, args: argparse.Namespace, dev: str) -> PrefillCase:
    """The prefill rows' random prompt, bf16, seeded, and the sparse path that prefills it."""
    g = torch.Generator(device=dev).manual_seed(ctx)
    nb = ctx // BS
    cache = torch.randn(nb, 1, 2, BS, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = torch.randn(ctx, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    table = torch.arange(nb, device=dev, dtype=torch.int32)[None]
    attn = AttentionMetadata(
        torch.arange(ctx, device=dev), table, torch.tensor([ctx], device=dev, dtype=torch.int32),
        torch.tensor([0, ctx], device=dev, dtype=torch.int32), False,
    )  # fmt: skip
    config = SparseConfig(mode="prefill", col_block=args.col_block)
    return PrefillCase(
        q, cache, table, attn, SparseAttention(config, cache, streaming_mask(args.stream_fraction))
    )


def tiles_only_row(ctx: int, args: argparse.Namespace, dev: str) -> dict[str, Any]:
    """The prefill row's masks (the real sampling) and tile counts at the GPU's bf16 tile
    shapes, no attention run or timed: where no GPU is, what the GPU run's kernels will do."""
    q, cache, _, attn, sparse = prefill_case(ctx, args, dev)
    keep, window = sparse.prefill_masks(0, q, cache, attn, D**-0.5)
    row = {"context": ctx, "density": sparse.stats_extra()["sparse_prefill_density"]}
    return row | tile_counts(ctx, keep, window, sparse.config.col_block, on_cuda=True)


def prefill_row(ctx: int, args: argparse.Namespace, dev: str) -> dict[str, Any]:
    q, cache, table, attn, sparse = prefill_case(ctx, args, dev)
    scale = D**-0.5
    dense_fn = lambda: kernels.paged_prefill_attention(  # noqa: E731
        q, cache, 0, table, attn.query_start_loc, attn.context_lens, scale
    )
    sparse_fn = lambda: sparse.prefill(0, q, cache, attn, scale)  # noqa: E731
    k = cache[:, 0, 0].reshape(ctx, HKV, D).transpose(0, 1)[None].contiguous()
    v = cache[:, 0, 1].reshape(ctx, HKV, D).transpose(0, 1)[None].contiguous()
    qs = q.transpose(0, 1)[None]
    sdpa_fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
        qs, k, v, is_causal=True, scale=scale, enable_gqa=True
    )
    err = kernels.reference.rel_err(sparse_fn().float(), dense_fn().float())
    sparse.counters.prefill_pairs = sparse.counters.prefill_causal_pairs = 0.0
    keep, window = sparse.prefill_masks(0, q, cache, attn, scale)
    density = sparse.stats_extra()["sparse_prefill_density"]
    kernel_fn = lambda: kernels.sparse_prefill_attention(  # noqa: E731
        q, cache, 0, table, attn.query_start_loc, attn.context_lens, scale, keep, window,
        sparse.config.col_block,
    )  # fmt: skip
    t = {"dense": bench(dense_fn, 10), "sparse": bench(sparse_fn, 10), "sdpa": bench(sdpa_fn, 10),
         "sparse_kernel": bench(kernel_fn, 10)}  # fmt: skip
    # the SampleAttention sampling alone, on the dense heads' rows as the prefill path passes them
    cfg = sparse.config
    dense_kv = (~streaming_mask(args.stream_fraction)[0]).nonzero().flatten().to(dev)
    keys, _ = gather_kv(cache, 0, table[0], ctx)
    q_dense = q.unflatten(1, (HKV, H // HKV))[:, dense_kv].flatten(1, 2)
    sample_fn = lambda: sample_columns(  # noqa: E731
        q_dense, keys[:, dense_kv], scale, cfg.col_block, cfg.alpha, cfg.sample_stride,
        cfg.sample_last,
    )[0]  # fmt: skip
    sample = {"fused": bench(sample_fn, 10)}
    fused_keep = sample_fn()
    with reference_ops("sampled_column_mass"):  # the torch reference (before the fused kernel)
        sample["torch"] = bench(sample_fn, 10)
        torch_keep = sample_fn()
        t["sparse_torch_sample"] = bench(sparse_fn, 10)
    gemm = gemm_seconds(ctx, dev)
    tiles = tile_row(q, cache, table, attn, keep, window, sparse.config.col_block, t)
    return {
        "context": ctx, "attn_s": t, "gemm_s": gemm, "density": density, "rel_err_vs_dense": err,
        "tiles": tiles,
        "sample_ms": {k: v * 1e3 for k, v in sample.items()},
        "sample_keep_agree": float((fused_keep == torch_keep).float().mean()),
        "ttft_est_s": {k: LAYERS * (v + gemm) for k, v in t.items()},
        "attn_speedup_vs_dense": t["dense"] / t["sparse"],
        "attn_speedup_vs_sdpa": t["sdpa"] / t["sparse"],
        "ttft_speedup_vs_dense": (t["dense"] + gemm) / (t["sparse"] + gemm),
    }  # fmt: skip


def tile_counts(
    ctx: int, keep: torch.Tensor, window: torch.Tensor, col_block: int, on_cuda: bool
) -> dict[str, Any]:
    """Tiles each prefill kernel runs at its own bf16 tile shape over one ctx-token prompt:
    dense, every causal (query tile, key tile) pair; sparse, the pairs its mask shows a row any
    key of (``prefill_tile_pairs``, what the kernel's counter must sum to). ``work_ratio`` =
    sparse / dense tile area."""
    dense_m, dense_n = triton_prefill.prefill_tiles(D, torch.bfloat16, on_cuda)
    block_m, block_n = triton_sparse_prefill.prefill_tiles(D, torch.bfloat16, on_cuda, col_block)
    rows_end = torch.arange(dense_m, ctx + dense_m, dense_m).clamp(max=ctx)  # each query tile's
    dense_tiles = float((-(-rows_end // dense_n)).sum()) * H  # causal key tiles, every head
    sparse_tiles, _ = prefill_tile_pairs(keep[0], window[0], 0, ctx, ctx, col_block, block_m,
                                         block_n)  # fmt: skip
    return {
        "dense_tile": [dense_m, dense_n], "sparse_tile": [block_m, block_n],
        "dense": dense_tiles, "sparse_expected": sparse_tiles,
        "work_ratio": sparse_tiles * block_m * block_n / (dense_tiles * dense_m * dense_n),
    }  # fmt: skip


def tile_row(
    q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, attn: AttentionMetadata,
    keep: torch.Tensor, window: torch.Tensor, col_block: int, t: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """``tile_counts`` beside ``time_ratio`` = the sparse kernel's time (masks given, no
    sampling) / dense's, which tracks ``work_ratio`` when a sparse tile costs what a dense one
    does, and, where the Triton body runs, the kernel's own count per key range
    (``kernel_counts``: wholly and partly kept tiles behind the window, window edge, seen whole,
    diagonal; ``counts_match``: its sum is the expected count)."""
    row = tile_counts(q.shape[0], keep, window, col_block, q.is_cuda)
    row["time_ratio"] = t["sparse_kernel"] / t["dense"]
    if q.is_cuda:
        counts = torch.zeros(5, dtype=torch.int32, device=q.device)
        triton_sparse_prefill.sparse_prefill_attention(
            q, cache, 0, table, attn.query_start_loc, attn.context_lens, D**-0.5, keep, window,
            col_block, tile_counts=counts,
        )  # fmt: skip
        row["kernel_counts"] = counts.tolist()
        row["counts_match"] = sum(row["kernel_counts"]) == row["sparse_expected"]
    return row


class DecodeCase(NamedTuple):
    cache: torch.Tensor  # one layer's KV over batch × ctx tokens in shuffled blocks
    q: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    attn: AttentionMetadata  # a decode step's metadata: each row writes its last slot
    keys: list[str]
    ctxs: list[int]


def decode_case(ctx: int, batch: int, dev: str) -> DecodeCase:
    """The decode rows' random step: ``batch`` sequences of ``ctx`` tokens, bf16, seeded."""
    g = torch.Generator(device=dev).manual_seed(ctx + batch)
    nb = ctx // BS
    cache = torch.randn(batch * nb, 1, 2, BS, HKV, D, device=dev, dtype=torch.bfloat16,
                        generator=g)  # fmt: skip
    q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(batch * nb, device=dev, generator=g).view(batch, nb).to(torch.int32)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    slots = tables[:, -1].long() * BS + BS - 1
    attn = AttentionMetadata(slots, tables, lens, torch.arange(batch + 1, device=dev), True)
    return DecodeCase(cache, q, tables, lens, attn, [str(i) for i in range(batch)], [ctx] * batch)


def decode_row(ctx: int, batch: int, args: argparse.Namespace, dev: str) -> dict[str, Any]:
    cache, q, tables, lens, attn, keys, ctxs = decode_case(ctx, batch, dev)
    scale = D**-0.5

    def first_layer(sparse: SparseAttention) -> torch.Tensor:  # a new step: its shared work too
        sparse.begin_step(keys, ctxs, True)
        return sparse.decode(0, q, cache, attn, scale)

    def made(reuse_steps: int) -> SparseAttention:
        config = SparseConfig(mode="decode", budget=args.budget)
        sparse = SparseAttention(config, cache, streaming_mask(args.stream_fraction))
        # set after construction: SparseAttention refuses reuse past a block (an engine would
        # miss blocks), and "never again" is only this bench's way to time a reusing layer
        sparse.config = dataclasses.replace(config, reuse_steps=reuse_steps)
        first_layer(sparse)  # first sight: bounds recomputed from the cache, a selection made
        first_layer(sparse)  # a steady step: selecting again or reusing
        return sparse

    refreshing, reusing = made(1), made(1 << 30)  # select every step / never again
    out = refreshing.decode(0, q, cache, attn, scale)
    dense_fn = lambda: kernels.paged_decode_attention(q, cache, 0, tables, lens, scale)  # noqa: E731
    err = kernels.reference.rel_err(out.float(), dense_fn().float())
    k = cache[:, 0, 0][tables.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    v = cache[:, 0, 1][tables.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    sdpa_fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q[:, :, None], k, v, scale=scale, enable_gqa=True
    )
    t: dict[str, float] = {"dense": bench(dense_fn), "sdpa": bench(sdpa_fn)}
    ops: dict[str, dict[str, int]] = {}
    for name, sparse in (("refresh", refreshing), ("reuse", reusing)):
        # a later layer of the step (decode of layer 0 again), and the step's first layer
        later = lambda sp=sparse: sp.decode(0, q, cache, attn, scale)  # noqa: E731
        first = lambda sp=sparse: first_layer(sp)  # noqa: E731
        ops[name] = ops_of(later)
        ops[f"{name}_step_extra"] = {k: v - ops[name][k] for k, v in ops_of(first).items()}
        t_later, t_first = bench(later), bench(first)
        t[f"sparse_{name}_first_layer"] = t_first
        # per layer of a LAYERS-layer step: the step's shared work spread over its layers
        t[f"sparse_{name}"] = t_later + (t_first - t_later) / LAYERS
    reuse = refreshing.config.reuse_steps  # the default: 1, every step refreshes
    t["sparse"] = (t["sparse_refresh"] + (reuse - 1) * t["sparse_reuse"]) / reuse
    reusing.begin_step(keys, ctxs, True)
    reusing.counters.selected_tokens = reusing.counters.context_tokens = 0.0
    reusing.decode(0, q, cache, attn, scale)
    read_fraction = reusing.stats_extra()["sparse_decode_read_fraction"]
    graph: dict[str, Any] = {"skipped": "no CUDA device"}
    if dev == "cuda":
        del refreshing, reusing, k, v, cache
        empty_cache()
        graph = graph_row(ctx, batch, args, q, attn)
    return {
        "context": ctx, "batch": batch, "attn_s": t, "ops_per_layer_call": ops,
        "rel_err_vs_dense": err, "read_fraction": read_fraction,
        "speedup_vs_dense": t["dense"] / t["sparse"], "speedup_vs_sdpa": t["sdpa"] / t["sparse"],
        "graph": graph,
    }  # fmt: skip


def refresh_parts_row(ctx: int, batch: int, args: argparse.Namespace, dev: str) -> dict[str, Any]:
    """Where a refresh layer's time goes: each of its ops timed alone (``do_bench`` medians,
    the ops as ``SparseAttention._select`` and ``decode`` call them) and, on CUDA, each op's
    GPU time alone (``graph_us``: 20 calls in one CUDA graph, no host time; the bound and exact
    scores' bandwidth from it, ``*_gbps``), the profiler's kernel table for 20 later-layer
    refresh calls (µs and launches per layer call) and the shortlist selection's variants timed
    in a graph (``shortlist_topk_us``)."""
    from kvrelay.kernels.sparse_reference import keys_as_bounds

    cache, q, tables, _, attn, keys, ctxs = decode_case(ctx, batch, dev)
    scale = D**-0.5
    sparse = SparseAttention(
        SparseConfig(mode="decode", budget=args.budget), cache, streaming_mask(args.stream_fraction)
    )
    for _ in range(2):  # first sight (bounds rebuilt), then a steady refresh step
        sparse.begin_step(keys, ctxs, True)
        sparse.decode(0, q, cache, attn, scale)
    step = sparse._step
    assert step is not None
    stream = sparse._stream_rows[0]
    cfg, k = sparse.config, sparse.dense.topk
    scores = kernels.block_scores(q, sparse.bounds, 0, step.block_tables, stream)
    short = step.select(scores, k * cfg.rerank)
    keys_bnd = keys_as_bounds(cache)
    exact = kernels.block_scores(q, keys_bnd, 0, step.block_tables, stream, ids=short)
    topk = step.rerank(short, exact)
    tabs, tlens = step.tables(topk, stream, False)
    parts = {
        "bound_scores": lambda: kernels.block_scores(
            q, sparse.bounds, 0, step.block_tables, stream
        ),
        "shortlist_topk": lambda: step.select(scores, k * cfg.rerank),
        "exact_scores": lambda: kernels.block_scores(
            q, keys_bnd, 0, step.block_tables, stream, ids=short
        ),
        "rerank": lambda: step.rerank(short, exact),
        "tables": lambda: step.tables(topk, stream, False),
        "attention": lambda: kernels.sparse_decode_attention(q, cache, 0, tabs, tlens, scale),
        "layer": lambda: sparse.decode(0, q, cache, attn, scale),
    }
    row: dict[str, Any] = {"context": ctx, "batch": batch,
                           "ms": {name: bench(fn) * 1e3 for name, fn in parts.items()}}  # fmt: skip
    dense_heads = HKV - (0 if stream is None else int(stream.sum()))
    # what bound_scores must read: kmax and kmin of every sub-page of every block, dense heads
    row["bound_bytes"] = tables.numel() * 2 * sparse.pages * D * 2 * dense_heads
    row["bound_scores_gbps"] = row["bound_bytes"] / row["ms"]["bound_scores"] / 1e6
    # what exact_scores must read: the keys of the shortlisted blocks, dense heads
    row["exact_bytes"] = batch * short.shape[2] * BS * D * 2 * dense_heads
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        graph_us = {}
        for name, fn in parts.items():
            if name == "layer":  # the eager layer: not captured here (the decode rows' graph)
                continue

            def twenty(fn: Callable[[], object] = fn) -> None:
                for _ in range(20):
                    fn()

            graph_us[name] = round(bench(captured(twenty).replay) / 20 * 1e6, 1)
        row["graph_us"] = graph_us
        row["graph_us_sum"] = round(sum(graph_us.values()), 1)
        for name in ("bound", "exact"):
            row[f"{name}_scores_graph_gbps"] = round(
                row[f"{name}_bytes"] / graph_us[f"{name}_scores"] / 1e3, 1
            )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                parts["layer"]()
            torch.cuda.synchronize()
        table = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        row["kernels_us_per_call"] = {
            e.key[:80]: round(e.device_time_total / 20, 1) for e in table[:12]
        }
        row["kernel_launches_per_call"] = {e.key[:80]: e.count / 20 for e in table[:12]}
        row["shortlist_topk_us"] = shortlist_topk_us(scores, k * cfg.rerank, step)
    return row


def shortlist_topk_us(scores: torch.Tensor, k: int, step: DecodeStep) -> dict[str, Any]:
    """The refresh's shortlist selection alone, µs a call with no host time (20 calls captured
    in one CUDA graph and replayed): ``topk_blocks`` keeping a row of up to ``TOPK_CHUNK``
    values in registers (the default), the same kernel reloading 4096-value chunks on every pass
    (what 8192 blocks took before), and torch's topk (unmasked: radix select + sort of the k)
    as the peer; ``same_ids``: both kernel paths keep the same ids."""
    from kvrelay.kernels import triton_topk

    lo, hi = step.dense.sink, step.hi
    calls: dict[str, Callable[[], object]] = {
        "registers": lambda: triton_topk.topk_blocks(scores, k, lo, hi),
        "chunks_4096": lambda: triton_topk.topk_blocks(scores, k, lo, hi, chunk=4096),
        "torch_topk": lambda: scores.topk(min(k, scores.shape[2]), dim=-1),
    }
    out: dict[str, Any] = {"n": scores.shape[2], "k": k, "rows": scores.shape[0] * scores.shape[1]}
    for name, fn in calls.items():

        def twenty(fn: Callable[[], object] = fn) -> None:
            for _ in range(20):
                fn()

        out[name] = round(bench(captured(twenty).replay) / 20 * 1e6, 1)
    a = triton_topk.topk_blocks(scores, k, lo, hi).sort(-1).values
    out["same_ids"] = torch.equal(
        a, triton_topk.topk_blocks(scores, k, lo, hi, chunk=4096).sort(-1).values
    )
    return out


def graph_row(
    ctx: int, batch: int, args: argparse.Namespace, q: torch.Tensor, attn: AttentionMetadata
) -> dict[str, Any]:
    """Seconds per layer of a decode step of ``layers`` layers captured in one CUDA graph and
    replayed, so that no host launch overhead is in the time: our dense decode kernel, and the
    sparse step as the engine captures it (``SparseAttention.static_step``) at a refresh and
    reusing the selection the refresh graph left in its static tensors, and with
    ``shortlist_steps`` 2 at a refresh and re-ranking its shortlists (``rerank``). A cache of random keys
    (and its key bounds) with ``layers`` = LAYERS or as many as fit in 80% of the free memory
    (one layer's KV at 32k+ is ≥ 0.5 GiB, far past the 50 MB L2, so no layer finds another's
    bytes there); skipped under 2 layers."""
    nblk = attn.block_tables.numel()
    per_layer = nblk * 2 * BS * HKV * D * 2 * (1 + 1 / 4)  # the cache + its key bounds
    free = torch.cuda.mem_get_info()[0]
    layers = min(LAYERS, int(0.8 * free // per_layer))
    if layers < 2:
        return {"skipped": f"a layer needs {per_layer / 2**30:.1f} GiB, {free / 2**30:.0f} free"}
    g = torch.Generator(device="cuda").manual_seed(ctx + batch)
    cache = torch.randn(nblk, layers, 2, BS, HKV, D, device="cuda", dtype=torch.bfloat16,
                        generator=g)  # fmt: skip
    tables, lens, scale = attn.block_tables, attn.context_lens, D**-0.5
    keys, ctxs = [str(i) for i in range(batch)], [ctx] * batch

    def dense() -> None:
        for layer in range(layers):
            kernels.paged_decode_attention(q, cache, layer, tables, lens, scale)

    t = {"dense": bench(captured(dense).replay)}
    config = SparseConfig(mode="decode", budget=args.budget, reuse_steps=2)
    sparse = SparseAttention(config, cache, streaming_mask(args.stream_fraction).expand(layers, -1))

    def step() -> None:
        for layer in range(layers):
            sparse.decode(layer, q, cache, attn, scale)

    for _ in range(2):  # eagerly: first sight (every layer's bounds rebuilt), a reusing step
        sparse.begin_step(keys, ctxs, True)
        step()
    sparse.begin_step(keys, ctxs, True)  # a refresh
    assert sparse.capturable() and sparse.reused_picks() is None
    sparse.fold_pending(cache)
    records = []

    def refresh() -> None:
        with sparse.static_step() as record:
            step()
        records.append(record)

    graph = captured(refresh)
    t["refresh"] = bench(graph.replay)
    sparse.replayed(records[-1], batch)  # the capture's record: what its replays rewrite
    sparse.begin_step(keys, ctxs, True)  # reusing the graph's selection
    assert sparse.capturable() and sparse.reused_picks() is records[-1]

    def reuse() -> None:
        with sparse.static_step(records[-1]):
            step()

    t["reuse"] = bench(captured(reuse).replay)
    # shortlist_steps 2: a refresh graph that keeps its shortlists, and the graph of a step
    # between that re-ranks them with its own query (the first sparse's bounds freed first:
    # one bounds tensor at a time, a quarter of the cache). Not yet run on a GPU: a failure
    # is recorded and leaves the rows above.
    del graph, sparse
    records.clear()
    empty_cache()
    shortlist_error = None
    try:
        config = SparseConfig(mode="decode", budget=args.budget, shortlist_steps=2)
        mask = streaming_mask(args.stream_fraction).expand(layers, -1)
        sparse = SparseAttention(config, cache, mask)
        for _ in range(2):  # eagerly: first sight, a step re-ranking the shortlist
            sparse.begin_step(keys, ctxs, True)
            step()
        sparse.begin_step(keys, ctxs, True)  # a refresh
        assert sparse.capturable() and sparse.reused_picks() is None
        sparse.fold_pending(cache)
        graph = captured(refresh)  # held: its replays rewrite the shortlists re-ranked below
        t["shortlist_refresh"] = bench(graph.replay)
        sparse.replayed(records[-1], batch)
        sparse.begin_step(keys, ctxs, True)  # re-ranking the graph's shortlists
        assert sparse.capturable() and sparse.reused_picks() is records[-1]
        t["rerank"] = bench(captured(reuse).replay)
    except (RuntimeError, AssertionError) as exc:
        shortlist_error = repr(exc)
        t.pop("shortlist_refresh", None)
    per_layer = {k: v / layers for k, v in t.items()}
    # what a step costs the engine, per layer: one refresh every reuse_steps steps (the default
    # 1: every step), the other steps reusing its selection; or one every shortlist_steps steps,
    # the other steps re-ranking its shortlist
    engine = {
        f"reuse_steps_{r}": (per_layer["refresh"] + (r - 1) * per_layer["reuse"]) / r
        for r in (1, 2, 4)
    }
    if "rerank" in per_layer:
        for r in (2, 4):
            engine[f"shortlist_steps_{r}"] = (
                per_layer["shortlist_refresh"] + (r - 1) * per_layer["rerank"]
            ) / r
    return {
        "layers": layers, "attn_s_per_layer": per_layer, "engine_step_s_per_layer": engine,
        "speedup_vs_dense": {k: t["dense"] / v for k, v in t.items() if k != "dense"},
        "engine_speedup_vs_dense": {k: per_layer["dense"] / v for k, v in engine.items()},
        "shortlist_error": shortlist_error,
    }  # fmt: skip


def decode_summary(row: dict[str, Any]) -> str:
    """One line: µs per layer, graph-replayed, as the engine sees a step (eager SDPA beside)."""
    g = row["graph"]
    head = f"decode {row['context']} b{row['batch']}: sdpa {row['attn_s']['sdpa'] * 1e6:.0f} us"
    if "skipped" in g:
        return f"{head}; graph skipped: {g['skipped']}"
    parts = [f"dense {g['attn_s_per_layer']['dense'] * 1e6:.1f}"]
    for name, v in g["engine_step_s_per_layer"].items():
        parts.append(f"{name} {v * 1e6:.1f} ({g['engine_speedup_vs_dense'][name]:.2f}x)")
    return f"{head}; graph ({g['layers']} layers), us/layer: " + ", ".join(parts)


def prefill_summary(row: dict[str, Any]) -> str:
    """One line: ms per layer, density, and the tiles behind the times."""
    t, tiles = row["attn_s"], row["tiles"]
    times = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items())
    return (
        f"prefill {row['context']}: ms/layer {times}; density {row['density']:.2f}; tiles dense "
        f"{tiles['dense']:.0f} {tiles['dense_tile']}, sparse {tiles['sparse_expected']:.0f} "
        f"{tiles['sparse_tile']} (kernel {tiles.get('kernel_counts', '-')}); work ratio "
        f"{tiles['work_ratio']:.2f}, kernel time ratio {tiles['time_ratio']:.2f}; TTFT speedup "
        f"{row['ttft_speedup_vs_dense']:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--stream-fraction", type=float, default=0.5)
    ap.add_argument(
        "--col-block",
        type=int,
        default=SparseConfig().col_block,
        help="prefill column block (SampleAttention's keep granularity)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["decode", "prefill"],
        choices=("decode", "prefill", "refresh_parts", "tiles"),
    )
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result: dict[str, Any] = {"device": name, "args": vars(args),
                              "prefill": [], "decode": []}  # fmt: skip

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if dev == "cpu" and "decode" in args.parts:
        print("decode: graph rows skipped (no CUDA device)", flush=True)
    for ctx in args.contexts if "decode" in args.parts else ():
        for batch in args.batches:
            row = decode_row(ctx, batch, args, dev)
            print("decode", json.dumps(row), flush=True)
            print(decode_summary(row), flush=True)
            result["decode"].append(row)
            save()
            empty_cache()
    for ctx in args.contexts if "refresh_parts" in args.parts else ():
        for batch in args.batches:
            row = refresh_parts_row(ctx, batch, args, dev)
            print("refresh_parts", json.dumps(row), flush=True)
            result.setdefault("refresh_parts", []).append(row)
            save()
            empty_cache()
    for ctx in args.contexts if "tiles" in args.parts else ():
        row = tiles_only_row(ctx, args, dev)
        print("tiles", json.dumps(row), flush=True)
        result.setdefault("tiles", []).append(row)
        save()
        empty_cache()
    for ctx in args.contexts if "prefill" in args.parts else ():
        row = prefill_row(ctx, args, dev)
        print("prefill", json.dumps(row), flush=True)
        print(prefill_summary(row), flush=True)
        result["prefill"].append(row)
        save()
        empty_cache()


if __name__ == "__main__":
    main()
